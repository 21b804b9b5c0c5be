"""Bots that play a whole session of the table game (``examples/table.py``) with the Python client.

    lobby serve examples.table:app &
    python -m examples.bots --url ws://127.0.0.1:8082 --players 4

N bots (``bot1`` ... ``botN``) link, sit at one table (``bot1`` first, so it is the host) and say hello; an
``intruder`` sits down and the host kicks it; the last bot's connection drops and the client's automatic
relink brings it back (the table shows it disconnected, then connected); everyone gets ready, the countdown
runs and the game is announced; then everyone leaves the table and the lobby. Each step waits (bounded by
``--timeout``) until every bot has seen what it should; the script narrates on stdout and exits 0, or exits
1 saying which step did not happen.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from lobby import Client, ClientError, RelinkPolicy

__all__ = ["Bot", "SessionError", "play", "main"]


class SessionError(Exception):
    """A step of the session did not happen in time."""


class Bot:
    """One player: a :class:`lobby.Client` with automatic relink, and every table message it received."""

    def __init__(self, name: str, *, timeout: float, narrate: Callable[[str], None]) -> None:
        self.name = name
        self.timeout = timeout
        self.narrate = narrate
        self.client = Client(relink=RelinkPolicy(base_delay=0.05, max_delay=1.0, max_attempts=10))
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self.client.on("*", self._on_event)

    def _on_event(self, event: str, *args: Any) -> None:
        if event == "message":
            self.messages.append(args[0])
        elif event == "relinking":
            self.narrate(f"{self.name}: connection lost, relinking (attempt {args[0]}, in {args[1]:.2f} s)")
        elif event == "relinked":
            self.narrate(f"{self.name}: relinked as {args[0]} (attempt {args[1]})")
        elif event == "relink_failed":
            self.narrate(f"{self.name}: relink failed: {args[0]}")
        self._changed.set()

    async def until(self, predicate: Callable[[], Any], what: str) -> Any:
        """Wait until ``predicate()`` is truthy (checked after every event); return its value."""
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    self._changed.clear()
                    result = predicate()
                    if result:
                        return result
                    await self._changed.wait()
        except TimeoutError:
            raise SessionError(f"{self.name} waited {self.timeout} s for {what} in vain") from None

    async def request(self, type_: str, payload: Any = None) -> None:
        await self.client.send({"type": type_} if payload is None else {"type": type_, "payload": payload})

    def received(self, type_: str) -> list[Any]:
        return [m.get("payload") for m in self.messages if m["type"] == type_]

    def state(self) -> dict[str, Any] | None:
        states = self.received("table/state")
        return states[-1] if states else None

    def sees(self, check: Callable[[dict[str, Any]], bool]) -> Callable[[], bool]:
        """A predicate: this bot's latest table state passes ``check``."""

        def predicate() -> bool:
            state = self.state()
            return state is not None and check(state)

        return predicate


def players_of(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["username"]: p for p in state["players"]}


async def play(url: str, players: int = 4, *, table: str = "main", timeout: float = 20.0,
               narrate: Callable[[str], None] = print) -> list[str]:
    """Run one full session against the table server at ``url``; return the narration."""
    if players < 2:
        raise ValueError("a session needs at least 2 players")
    story: list[str] = []

    def say(line: str) -> None:
        story.append(line)
        narrate(line)

    bots = [Bot(f"bot{i}", timeout=timeout, narrate=say) for i in range(1, players + 1)]
    names = [bot.name for bot in bots]
    host, dropper = bots[0], bots[-1]
    intruder = Bot("intruder", timeout=timeout, narrate=say)
    try:
        # 1. Everyone links (waiting for a server started in the background just before them).
        for bot in bots:
            await _connect_once_up(bot.client, url, timeout)
            await bot.client.link(bot.name)
            say(f"{bot.name}: linked")

        # 2. Everyone sits at the table, bot1 first: it is the host.
        for bot in bots:
            await bot.request("table/join", {"table": table})
            await bot.until(bot.sees(lambda s, b=bot: b.name in players_of(s)), f"a seat at {table}")
        for bot in bots:
            await bot.until(bot.sees(lambda s: list(players_of(s)) == names), f"all {players} players seated")
        say(f"{', '.join(names)} sit at {table}; the host is {host.state()['host']}")  # type: ignore[index]

        # 3. Chat.
        for bot in bots:
            await bot.request("table/chat", {"text": f"hello from {bot.name}"})
        for bot in bots:
            await bot.until(lambda b=bot: len(b.received("table/chat")) >= players, "everyone's hello")
        say(f"chat: {'; '.join(c['from'] + ': ' + c['text'] for c in host.received('table/chat'))}")

        # 4. An intruder sits down; the host kicks it.
        await intruder.client.connect(url)
        await intruder.client.link(intruder.name)
        await intruder.request("table/join", {"table": table})
        await host.until(host.sees(lambda s: "intruder" in players_of(s)), "the intruder at the table")
        say("intruder: sat down")
        await host.request("table/kick", {"username": "intruder"})
        kicked = await intruder.until(lambda: intruder.received("table/kicked"), "being kicked")
        say(f"intruder: kicked from {kicked[0]['table']} by {kicked[0]['by']}")
        await intruder.client.leave()
        await intruder.client.disconnect()
        for bot in bots:
            await bot.until(bot.sees(lambda s: list(players_of(s)) == names), "the table without the intruder")

        # 5. The last bot's connection drops; its client relinks by itself.
        dropped = len(dropper.received("table/state"))
        dropper.client.drop()
        say(f"{dropper.name}: connection dropped")
        await host.until(host.sees(lambda s: not players_of(s)[dropper.name]["connected"]),
                         f"{dropper.name} shown disconnected")
        say(f"{host.name} sees {dropper.name} disconnected")
        await dropper.until(lambda: len(dropper.received("table/state")) > dropped and dropper.client.status == "linked",
                            "being back at the table")
        await host.until(host.sees(lambda s: players_of(s)[dropper.name]["connected"]),
                         f"{dropper.name} shown connected again")
        say(f"{host.name} sees {dropper.name} back")

        # 6. Everyone is ready: the countdown runs, the game starts.
        for bot in bots:
            await bot.request("table/ready", {"ready": True})
        countdown = await host.until(lambda: host.received("table/countdown"), "the countdown")
        say(f"countdown: {countdown[-1]['seconds']} s")
        for bot in bots:
            await bot.until(lambda b=bot: b.received("table/started"), "the game start")
        started = host.received("table/started")[-1]
        say(f"game started at {started['table']} with {', '.join(started['players'])}")

        # 7. Everyone leaves the table and the lobby.
        for bot in bots:
            await bot.request("table/leave")
            await bot.until(lambda b=bot: b.received("table/tables")
                            and b.messages[-1]["type"] == "table/tables", "standing up")
            await bot.client.leave()
            await bot.client.disconnect()
            say(f"{bot.name}: left")
        return story
    finally:
        for bot in (*bots, intruder):
            if bot.client.relinking or bot.client.status not in ("initializing", "closed"):
                await bot.client.disconnect(force=True)


async def _connect_once_up(client: Client, url: str, timeout: float) -> None:
    """Connect, trying again while nothing listens yet, for ``timeout`` seconds at most."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await client.connect(url)
            return
        except ClientError:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.bots", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8082/", help="the table server (default %(default)s)")
    parser.add_argument("--players", type=int, default=4, help="number of bots, at least 2 (default %(default)s)")
    parser.add_argument("--table", default="main", help="the table to play at (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds each step may take (default %(default)s)")
    args = parser.parse_args(argv)
    if args.players < 2:
        parser.error("--players must be at least 2")
    try:
        asyncio.run(play(args.url, args.players, table=args.table, timeout=args.timeout,
                         narrate=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:  # Ctrl-C: the bots disconnect as the loop ends them
        return 130
    except (SessionError, OSError) as error:
        print(f"session failed: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a ClientError, LinkRejected, ...: say it in one line
        print(f"session failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print("session complete", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
