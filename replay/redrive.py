"""``lobby replay redrive``: send a session's recorded client inputs to a fresh server, find the first
place where what it records differs from the old log (a regression finder).

The fresh server is the caller's (``lobby.Server`` with the app under test, not started): this module
never imports ``lobby``. It is configured with a new log in a temporary folder, listens on a free local
port, and starts from the registry the old session started from (a short synthetic prefix written to its
new log: the same users, linked or not, and whether the previous session closed, so a crash is recovered
the same way).

What is replayed, from the old log, in order, each over a websocket of its own user:

- a ``link`` (and the ``join`` before it, for a new user, with what the app's join listeners sent in
  between): ``krmx/link``. The auth string is never
  stored, so a link that had one sends ``auth`` (a placeholder, ``"redrive"`` by default): an app whose
  authenticate checks secrets needs a test double that accepts it.
- a ``message``: the same frame.
- an ``unlink`` with reason ``requested``: ``krmx/unlink``, or ``krmx/leave`` when a ``leave`` (requested)
  follows it; ``dropped``, ``ping timeout``, ``frame too large`` and the other cut-offs of a linked user
  (``rate limit``, ``flood``, ``slow consumer``): the socket is closed (so these compare as one reason,
  ``connection lost``, and the ``cutoff`` events are left out of the comparison); ``invalid message``: a frame that is not JSON; ``reserved
  type``: a ``krmx/...`` frame; ``link while linked``: a second ``krmx/link``.
- the ``close`` at the end (and the unlinks and leaves of that close): ``server.close()``, keeping users
  when the old close did (reason ``server restart``).

Everything else (joins, kicks, unlinks, sends and broadcasts done by the app, the recovery unlinks after a
crash) is the server's own doing: it is compared, not replayed. Events are compared by type, username and
data, ignoring seq, time, session and the listen port; in a run of custom messages, the clients' and the
app's are compared each in their own order, not by how they interleave (see ``_Driver.divergence``).
Before each input, the driver waits until the new server has recorded as many events as the old log had at
that point (at most ``settle`` seconds), so the order of inputs across users is the old order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from events import Close, Event, EventStore, Join, Link, Listen, Registry

from .index import registry_at
from .reader import ReplayError, open_log
from .render import event_json, event_row

__all__ = ["RedriveReport", "Divergence", "Input", "plan_inputs", "redrive", "redrive_async", "comparable"]

#: Unlink reasons that all mean "the connection went away": a replay can only close the socket (the timing
#: of a flood, a slow reader or a missed pong is not in the log).
CONNECTION_LOST = frozenset({"dropped", "ping timeout", "flood", "frame too large", "rate limit", "slow consumer",
                             "protocol error"})
#: Reasons of the unlinks and leaves a server close records.
CLOSE_REASONS = frozenset({"close", "server restart"})
CLIENT_VERSION = "0.6.0"


#: Custom messages: within a run of them, only the order of each side's own messages is compared.
CUSTOM = frozenset({"message", "send", "broadcast"})


def _run_end(events: list[Event], start: int) -> int:
    end = start
    while end < len(events) and events[end].type in CUSTOM:
        end += 1
    return end


def comparable(event: Event) -> tuple[Any, ...]:
    """What must be equal between the old and the new log: type, username and data (no seq, at, session)."""
    data = event.data()
    if event.type == "listen":
        data = {}
    elif event.type == "unlink" and data.get("reason") in CONNECTION_LOST:
        data = {"reason": "connection lost"}
    return (event.type, getattr(event, "username", None), orjson.dumps(data, option=orjson.OPT_SORT_KEYS))


@dataclass(frozen=True, slots=True)
class Input:
    """A client (or operator) action to replay before the old event at ``index`` of the session."""

    index: int
    action: str  # link, message, unlink, leave, drop, invalid, reserved, relink, close
    username: str | None = None
    message: Any = None
    auth: bool = False
    keep_users: bool = False


def plan_inputs(old: list[Event]) -> list[Input]:
    """The inputs that made the old session, each at the index of the first event it caused."""
    close_at = len(old)
    if old and old[-1].type == "close":
        close_at = len(old) - 1
        while close_at > 0 and old[close_at - 1].type in ("unlink", "leave") and (
            getattr(old[close_at - 1], "reason", None) in CLOSE_REASONS
        ):
            close_at -= 1
    inputs: list[Input] = []
    consumed: set[int] = set()
    for index, event in enumerate(old[:close_at]):
        if index in consumed:
            continue
        username = getattr(event, "username", None)
        following = old[index + 1] if index + 1 < close_at else None
        same_user_next = following is not None and getattr(following, "username", None) == username
        if event.type == "join":
            # A client's link of a new user records its join, then what the join listeners send, then
            # the link, all in one turn (one time): one input. A join without a link of the same user
            # after it (in its turn, when something came between) is the app's doing.
            after = index + 1
            while after < close_at and old[after].type in ("send", "broadcast") and old[after].at == event.at:
                after += 1
            linked = old[after] if after < close_at else None
            same_turn = after == index + 1 or (linked is not None and linked.at == event.at)
            if same_turn and linked is not None and linked.type == "link" and getattr(linked, "username", None) == username:
                inputs.append(Input(index, "link", username, auth=linked.auth))  # type: ignore[attr-defined]
                consumed.add(after)
        elif event.type == "link":
            inputs.append(Input(index, "link", username, auth=event.auth))  # type: ignore[attr-defined]
        elif event.type == "message":
            inputs.append(Input(index, "message", username, message=event.message))  # type: ignore[attr-defined]
        elif event.type == "unlink":
            reason = event.reason  # type: ignore[attr-defined]
            if reason == "requested":
                leaving = same_user_next and following.type == "leave"  # type: ignore[union-attr]
                inputs.append(Input(index, "leave" if leaving else "unlink", username))
                if leaving:
                    consumed.add(index + 1)
            elif reason in CONNECTION_LOST:
                inputs.append(Input(index, "drop", username))
            elif reason == "invalid message":
                inputs.append(Input(index, "invalid", username))
            elif reason == "reserved type":
                inputs.append(Input(index, "reserved", username))
            elif reason == "link while linked":
                inputs.append(Input(index, "relink", username))
    if close_at < len(old):
        inputs.append(Input(close_at, "close", keep_users=old[-1].reason == "server restart"))  # type: ignore[attr-defined]
    return inputs


@dataclass(frozen=True, slots=True)
class Divergence:
    """The first event where the logs differ: position ``index`` in the session, the old event and what
    the new server recorded there (``None``: nothing, within the settle time)."""

    index: int
    old: Event | None
    new: Event | None
    #: The last events both logs agree on, oldest first (old log's seqs).
    before: list[Event] = field(default_factory=list)
    #: The links the new server rejected so far, by username: the reason it gave (often the difference's cause).
    rejected: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return "\n".join(self.lines())

    def lines(self) -> list[str]:
        """The report's lines, each one line whatever its events hold (the CLI escapes what is in them)."""
        lines = [f"first difference at event #{self.index + 1} of the session:"]
        lines.append("  old: " + (event_row(self.old) if self.old is not None else "(nothing: the old session ended here)"))
        lines.append("  new: " + (event_row(self.new) if self.new is not None else "(nothing recorded)"))
        lines += [f"  the new server rejected the link of {name}: {reason}" for name, reason in self.rejected.items()]
        if self.before:
            lines.append("  after these events, equal in both:")
            lines.extend("    " + event_row(event) for event in self.before)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "old": event_json(self.old) if self.old is not None else None,
            "new": event_json(self.new) if self.new is not None else None,
            "before": [event_json(event) for event in self.before],
            "rejected": self.rejected,
        }


@dataclass
class RedriveReport:
    lobby: str
    session: str
    old_events: int
    new_events: int
    inputs: int
    divergence: Divergence | None
    #: The new server's log, when kept (``keep_db``).
    new_db: str | None = None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lobby": self.lobby, "session": self.session, "ok": self.ok, "old_events": self.old_events,
            "new_events": self.new_events, "inputs": self.inputs, "new_db": self.new_db,
            "divergence": self.divergence.to_dict() if self.divergence is not None else None,
        }


def _prefix(registry: Registry, lobby: str, at: int) -> list[Event]:
    """Events that bring a new log to ``registry``: the same users in the same order, linked or not, and
    a previous session that closed or not (so the new server recovers exactly what the old one did)."""
    if registry.session is None:
        return []
    common = {"lobby": lobby, "session": "redrive-prefix", "at": at}
    events: list[Event] = [Listen(**common)]
    events += [Join(**common, username=name) for name in registry.users]
    events += [Link(**common, username=name) for name, linked in registry.users.items() if linked]
    if registry.closed:
        events.append(Close(**common, reason="server restart"))
    return events


class _Driver:
    def __init__(self, server: Any, old: list[Event], settle: float, auth: str, version: str) -> None:
        self.server, self.old, self.settle, self.auth, self.version = server, old, settle, auth, version
        self.new: list[Event] = []
        self.sockets: dict[str, Any] = {}
        self.drains: set[asyncio.Task[None]] = set()
        self.checked = 0
        self.rejected: dict[str, str] = {}

    def url(self) -> str:
        path = getattr(getattr(self.server, "config", None), "path", "/")
        return f"ws://127.0.0.1:{self.server.port}{path}"

    async def wait_for(self, count: int) -> None:
        deadline = asyncio.get_running_loop().time() + self.settle
        while len(self.new) < count and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.002)

    def divergence(self, upto: int, final: bool = False) -> Divergence | None:
        """Compare the events both logs have up to ``upto`` (old indexes) that were not compared yet.

        A run of custom messages (``message``, ``send``, ``broadcast``) is compared as a whole once it has
        ended in both logs (``final``: nothing more will come): the clients' messages in their order, and
        the app's in theirs, but not how the two interleave. The old server may have taken several
        clients' messages in one turn (all of them, then every answer), where the replay sends them one
        at a time (each followed by its answer)."""
        while self.checked < upto:
            index = self.checked
            old = self.old[index] if index < len(self.old) else None
            new = self.new[index] if index < len(self.new) else None
            if old is not None and new is not None and old.type in CUSTOM and new.type in CUSTOM:
                old_end, new_end = _run_end(self.old, index), _run_end(self.new, index)
                if new_end == len(self.new) and not final:
                    return None  # the new run may go on: compare it once it has ended
                found = self._compare_run(index, old_end, new_end)
                if found is not None:
                    return found
                self.checked = old_end
                continue
            if old is None or new is None or comparable(old) != comparable(new):
                return Divergence(index, old, new, self.old[max(0, index - 3):index])
            self.checked += 1
        return None

    def _compare_run(self, start: int, old_end: int, new_end: int) -> Divergence | None:
        """The earliest difference (in the old log's order) between the clients' messages of the two runs,
        or between the app's; ``None`` when both sides are equal."""
        found: list[tuple[int, Event | None, Event | None]] = []
        for side in ("message",), ("send", "broadcast"):
            olds = [i for i in range(start, old_end) if self.old[i].type in side]
            news = [self.new[i] for i in range(start, new_end) if self.new[i].type in side]
            for k in range(max(len(olds), len(news))):
                old = self.old[olds[k]] if k < len(olds) else None
                new = news[k] if k < len(news) else None
                if old is None or new is None or comparable(old) != comparable(new):
                    if old is None:  # the new run has more: say what the old log had next instead
                        found.append((old_end, self.old[old_end] if old_end < len(self.old) else None, new))
                    else:
                        found.append((olds[k], old, new))
                    break
        if not found:
            return None
        index, old, new = min(found, key=lambda item: item[0])
        return Divergence(index, old, new, self.old[max(0, index - 3):index])

    async def socket(self, username: str) -> Any:
        from websockets.asyncio.client import connect

        ws = self.sockets.get(username)
        if ws is None:
            ws = self.sockets[username] = await connect(self.url(), max_size=None)
            task = asyncio.ensure_future(self._drain(username, ws))
            self.drains.add(task)
        return ws

    async def _drain(self, username: str, ws: Any) -> None:
        try:
            async for data in ws:
                if isinstance(data, str) and "krmx/rejected" in data:  # a link refused: why
                    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
                        message = orjson.loads(data)
                        if message["type"] == "krmx/rejected":
                            self.rejected[username] = str(message["payload"]["reason"])
        except Exception:
            pass

    async def send(self, username: str, message: Any) -> None:
        ws = await self.socket(username)
        await ws.send(message if isinstance(message, str) else orjson.dumps(message).decode())

    async def perform(self, step: Input) -> None:
        name = step.username or ""
        if step.action in ("link", "relink"):
            payload: dict[str, Any] = {"username": name, "version": self.version}
            if step.auth:
                payload["auth"] = self.auth
            await self.send(name, {"type": "krmx/link", "payload": payload})
        elif step.action == "message":
            await self.send(name, step.message)
        elif step.action == "unlink":
            await self.send(name, {"type": "krmx/unlink"})
        elif step.action == "leave":
            await self.send(name, {"type": "krmx/leave"})
        elif step.action == "invalid":
            await self.send(name, "this is not json")
        elif step.action == "reserved":
            await self.send(name, {"type": "krmx/redrive-reserved"})
        elif step.action == "drop":
            ws = self.sockets.pop(name, None)
            if ws is not None:
                await ws.close()
        elif step.action == "close":
            await self.server.close(keep_users=step.keep_users)

    async def run(self, inputs: list[Input]) -> Divergence | None:
        found = await self._first_difference(inputs)
        return found if found is None else replace(found, rejected=dict(self.rejected))

    async def _first_difference(self, inputs: list[Input]) -> Divergence | None:
        for step in inputs:
            await self.wait_for(step.index)
            found = self.divergence(step.index)
            if found is not None:
                return found
            await self.perform(step)
        await self.wait_for(len(self.old))
        await asyncio.sleep(min(0.1, self.settle))  # anything recorded after the last expected event
        found = self.divergence(len(self.old), final=True)
        if found is None and len(self.new) > len(self.old):
            index = len(self.old)
            return Divergence(index, None, self.new[index], self.old[max(0, index - 3):])
        return found

    async def finish(self) -> None:
        for ws in self.sockets.values():
            try:
                await asyncio.wait_for(ws.close(), 2)
            except Exception:
                pass
        for task in self.drains:
            task.cancel()
        await asyncio.gather(*self.drains, return_exceptions=True)
        if getattr(self.server, "status", None) == "listening":
            await self.server.close()


async def redrive_async(
    path: str | os.PathLike[str],
    server: Any | Callable[[], Any],
    session: str | None = None,
    *,
    lobby: str | None = None,
    settle: float = 2.0,
    auth: str = "redrive",
    client_version: str = CLIENT_VERSION,
    keep_db: str | os.PathLike[str] | None = None,
) -> RedriveReport:
    """Replay the client inputs of ``session`` (default: the last one) of the log at ``path`` against
    ``server`` (a ``lobby.Server`` not yet started, or a function making one) and report the first
    difference between what it records and the old log. See the module documentation for what is replayed."""
    with open_log(path) as log:
        info = log.session(session, lobby)
        # A cut-off is compared as the unlink that follows it (CONNECTION_LOST): the replay closes the socket.
        old = [event for event in log.session_events(info) if event.type != "cutoff"]
        start = registry_at(log, info.lobby, info.first_seq - 1)
    if isinstance(server, type) or not hasattr(server, "start"):  # a class or a function making one
        server = server()
    if keep_db is not None:
        check_new_log(keep_db)
    folder = tempfile.mkdtemp(prefix="lobby-redrive-")
    new_db = os.fspath(keep_db) if keep_db is not None else os.path.join(folder, "redrive.db")
    try:
        with EventStore(new_db) as store:
            store.append(_prefix(start, info.lobby, info.start))
        try:
            server.configure(db=new_db, host="127.0.0.1", port=0, lobby=info.lobby, ping_interval=None)
        except Exception as error:
            raise ReplayError(f"cannot configure the server to redrive on: {error}") from None
        driver = _Driver(server, old, settle, auth, client_version)
        server.on("event", lambda event: event.type == "cutoff" or driver.new.append(event))
        await server.start()
        inputs = plan_inputs(old)
        try:
            divergence = await driver.run(inputs)
            recorded = len(driver.new)  # not counting what closing the server after a crashed session adds
        finally:
            await driver.finish()
        return RedriveReport(
            lobby=info.lobby, session=info.session, old_events=len(old), new_events=recorded,
            inputs=len(inputs), divergence=divergence, new_db=new_db if keep_db is not None else None,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_new_log(path: str | os.PathLike[str]) -> None:
    """Refuse a ``keep_db`` path that exists: redrive writes a new log, never into another."""
    if os.path.lexists(path):
        raise ReplayError(f"{os.fspath(path)}: exists already; redrive writes a new log")


def redrive(
    path: str | os.PathLike[str],
    server: Any | Callable[[], Any],
    session: str | None = None,
    **options: Any,
) -> RedriveReport:
    """:func:`redrive_async` in an event loop of its own (for scripts and the CLI)."""
    return asyncio.run(redrive_async(path, server, session, **options))
