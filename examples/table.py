"""A small game lobby on the public API: named tables, a host, ready checks, kicks, a countdown, chat, and
players who drop and come back.

    lobby serve examples.table:app                      # ws://127.0.0.1:8082/, countdown 3 s
    TABLE_COUNTDOWN=0.5 lobby serve examples.table:app  # a shorter countdown
    python -m examples.bots --players 4                 # four bots play a whole session against it

Krmx gives users (join, link, unlink, leave) and messages; the tables are this app's own state, kept in
memory (the server's event log records every message, so a session can be replayed). All app messages use
the ``table/`` prefix.

Requests (client to server):

============================ =================================================================================
``table/join {"table": T}``  sit at table T (created if new: you are its host); leaves your previous table
``table/leave``              leave your table (the host passes to the next player; an empty table is removed)
``table/ready {"ready": B}`` mark yourself ready (``true``, the default) or not; when every player (at least
                             ``min_players``) is ready and connected, the countdown starts
``table/kick {"username": U}`` host only: U leaves the table and may not sit there again
``table/chat {"text": S}``   say something to your table
``table/list``               the tables (sent by itself when you link while not seated)
============================ =================================================================================

Announcements (server to client): ``table/state`` (to every connected player of a table, on every change:
``{"table", "host", "phase", "players": [{"username", "ready", "connected"}]}``), ``table/chat {"table",
"from", "text"}``, ``table/countdown {"table", "seconds"}``, ``table/countdown-cancelled {"table",
"reason"}``, ``table/started {"table", "players"}``, ``table/kicked {"table", "by"}``, ``table/tables
{"tables": [...]}`` and ``table/error {"request", "error"}``.

A player whose connection drops stays seated, shown ``"connected": false``; a countdown in progress is
cancelled, and starts again once everyone is back and still ready. A player who leaves the lobby leaves the
table. Once a game started, the table is ``playing`` and takes no new players.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lobby import Server

__all__ = ["TableApp", "Table", "Seat", "create_app", "app"]

DEFAULT_COUNTDOWN = 3.0
_TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
MAX_CHAT = 500


@dataclass
class Seat:
    username: str
    ready: bool = False
    connected: bool = True


@dataclass
class Table:
    name: str
    host: str
    seats: dict[str, Seat] = field(default_factory=dict)
    #: waiting, countdown or playing.
    phase: str = "waiting"
    banned: set[str] = field(default_factory=set)
    countdown: asyncio.Task[None] | None = None

    def state(self) -> dict[str, Any]:
        return {
            "table": self.name,
            "host": self.host,
            "phase": self.phase,
            "players": [{"username": s.username, "ready": s.ready, "connected": s.connected}
                        for s in self.seats.values()],
        }


class TableApp:
    """The table game's rules on a :class:`lobby.Server` (its listeners are registered here)."""

    def __init__(self, server: Server, *, countdown: float = DEFAULT_COUNTDOWN, min_players: int = 2) -> None:
        if countdown < 0:
            raise ValueError("countdown must not be negative")
        if min_players < 1:
            raise ValueError("min_players must be at least 1")
        self.server = server
        self.countdown = countdown
        self.min_players = min_players
        self.tables: dict[str, Table] = {}
        #: Where each seated player sits.
        self.seated: dict[str, str] = {}
        server.on("link", self.on_link)
        server.on("unlink", self.on_unlink)
        server.on("leave", self.on_leave)
        server.on("message", self.on_message)
        server.on("close", self.on_close)

    # -- sending ----------------------------------------------------------------------------------------

    def _to_table(self, table: Table, message: dict[str, Any]) -> None:
        if self.server.status != "listening":  # closing: every user is leaving anyway
            return
        for seat in table.seats.values():
            if seat.connected:
                self.server.send(seat.username, message)

    def _publish(self, table: Table) -> None:
        self._to_table(table, {"type": "table/state", "payload": table.state()})

    def _error(self, username: str, request: str, error: str) -> None:
        if self.server.status != "listening":
            return
        self.server.send(username, {"type": "table/error", "payload": {"request": request, "error": error}})

    def _tables(self) -> dict[str, Any]:
        return {"tables": [{"table": t.name, "host": t.host, "players": len(t.seats), "phase": t.phase}
                           for t in self.tables.values()]}

    # -- the countdown ----------------------------------------------------------------------------------

    def _check_countdown(self, table: Table) -> None:
        """Start the countdown when everyone is ready and connected; cancel it when that stops being so."""
        seats = table.seats.values()
        all_set = len(table.seats) >= self.min_players and all(s.ready and s.connected for s in seats)
        if table.phase == "waiting" and all_set:
            table.phase = "countdown"
            table.countdown = asyncio.ensure_future(self._count_down(table))
            self._to_table(table, {"type": "table/countdown", "payload": {"table": table.name, "seconds": self.countdown}})

    def _cancel_countdown(self, table: Table, reason: str) -> None:
        if table.phase != "countdown":
            return
        table.phase = "waiting"
        if table.countdown is not None:
            table.countdown.cancel()
            table.countdown = None
        self._to_table(table, {"type": "table/countdown-cancelled", "payload": {"table": table.name, "reason": reason}})

    async def _count_down(self, table: Table) -> None:
        await asyncio.sleep(self.countdown)
        if table.phase != "countdown" or self.tables.get(table.name) is not table:
            return
        table.phase = "playing"
        table.countdown = None
        players = list(table.seats)
        self._to_table(table, {"type": "table/started", "payload": {"table": table.name, "players": players}})
        self._publish(table)

    # -- seats ------------------------------------------------------------------------------------------

    def _sit(self, username: str, name: str) -> None:
        table = self.tables.get(name)
        if table is None:
            table = self.tables[name] = Table(name=name, host=username)
        table.seats[username] = Seat(username)
        self.seated[username] = name
        self._cancel_countdown(table, f"{username} sat down")
        self._publish(table)

    def _stand(self, username: str, reason: str) -> Table | None:
        """Remove ``username`` from its table; return the table if it still exists."""
        name = self.seated.pop(username, None)
        if name is None:
            return None
        table = self.tables[name]
        del table.seats[username]
        if not table.seats:
            if table.countdown is not None:
                table.countdown.cancel()
            del self.tables[name]
            return None
        if table.host == username:
            table.host = next(iter(table.seats))
        self._cancel_countdown(table, reason)
        self._publish(table)
        return table

    # -- listeners --------------------------------------------------------------------------------------

    def on_link(self, username: str) -> None:
        name = self.seated.get(username)
        if name is None:
            self.server.send(username, {"type": "table/tables", "payload": self._tables()})
            return
        table = self.tables[name]
        table.seats[username].connected = True
        self._publish(table)
        self._check_countdown(table)

    def on_unlink(self, username: str) -> None:
        name = self.seated.get(username)
        if name is None:
            return
        table = self.tables[name]
        table.seats[username].connected = False
        self._cancel_countdown(table, f"{username} disconnected")
        self._publish(table)

    def on_leave(self, username: str) -> None:
        self._stand(username, f"{username} left")

    def on_close(self) -> None:
        for table in self.tables.values():
            if table.countdown is not None:
                table.countdown.cancel()

    def on_message(self, username: str, message: dict[str, Any]) -> None:
        type_ = message["type"]
        payload = message.get("payload")
        data = payload if isinstance(payload, dict) else {}
        handler = {
            "table/join": self._join, "table/leave": self._leave, "table/ready": self._ready,
            "table/kick": self._kick, "table/chat": self._chat, "table/list": self._list,
        }.get(type_)
        if handler is None:
            if type_.startswith("table/"):
                self._error(username, type_, "unknown request")
            return
        error = handler(username, data)
        if error is not None:
            self._error(username, type_, error)

    # -- requests (each returns an error text, or None) -------------------------------------------------

    def _join(self, username: str, data: dict[str, Any]) -> str | None:
        name = data.get("table")
        if not isinstance(name, str) or not _TABLE_NAME.fullmatch(name):
            return "a table name is 1-32 letters, digits, - and _"
        if self.seated.get(username) == name:
            return f"you already sit at {name}"
        table = self.tables.get(name)
        if table is not None and username in table.banned:
            return f"you were kicked from {name}"
        if table is not None and table.phase == "playing":
            return f"the game at {name} has started"
        self._stand(username, f"{username} moved to another table")
        self._sit(username, name)
        return None

    def _leave(self, username: str, data: dict[str, Any]) -> str | None:
        if username not in self.seated:
            return "you do not sit at a table"
        self._stand(username, f"{username} left")
        self.server.send(username, {"type": "table/tables", "payload": self._tables()})
        return None

    def _ready(self, username: str, data: dict[str, Any]) -> str | None:
        name = self.seated.get(username)
        if name is None:
            return "you do not sit at a table"
        ready = data.get("ready", True)
        if not isinstance(ready, bool):
            return "ready must be true or false"
        table = self.tables[name]
        if table.phase == "playing":
            return "the game has started"
        table.seats[username].ready = ready
        if not ready:
            self._cancel_countdown(table, f"{username} is not ready")
        self._publish(table)
        self._check_countdown(table)
        return None

    def _kick(self, username: str, data: dict[str, Any]) -> str | None:
        name = self.seated.get(username)
        target = data.get("username")
        if name is None:
            return "you do not sit at a table"
        table = self.tables[name]
        if table.host != username:
            return "only the host can kick"
        if not isinstance(target, str) or target not in table.seats:
            return f"{target!r} does not sit at {name}"
        if target == username:
            return "the host cannot kick itself (leave instead)"
        table.banned.add(target)
        if table.seats[target].connected:
            self.server.send(target, {"type": "table/kicked", "payload": {"table": name, "by": username}})
        self._stand(target, f"{target} was kicked")
        return None

    def _chat(self, username: str, data: dict[str, Any]) -> str | None:
        name = self.seated.get(username)
        text = data.get("text")
        if name is None:
            return "you do not sit at a table"
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_CHAT:
            return f"a chat text is 1-{MAX_CHAT} characters"
        self._to_table(self.tables[name], {"type": "table/chat", "payload": {"table": name, "from": username, "text": text}})
        return None

    def _list(self, username: str, data: dict[str, Any]) -> str | None:
        self.server.send(username, {"type": "table/tables", "payload": self._tables()})
        return None


def create_app(*, countdown: float | None = None, min_players: int = 2, **server_options: Any) -> Server:
    """A fresh server running the table game. ``countdown`` defaults to ``$TABLE_COUNTDOWN`` or 3 s; the
    other keyword arguments go to :class:`lobby.Server` (``lobby serve`` flags still win over them). The
    game itself is ``server.game`` (a :class:`TableApp`)."""
    if countdown is None:
        countdown = float(os.environ.get("TABLE_COUNTDOWN", DEFAULT_COUNTDOWN))
    server = Server(**server_options)
    server.game = TableApp(server, countdown=countdown, min_players=min_players)  # type: ignore[attr-defined]
    return server


app = create_app()
