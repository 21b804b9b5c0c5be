"""Event logs recorded from real server sessions, for the replay tests (built once per test run).

- ``game_log``: an in-process server under freezegun (every event at a known time), two sessions: the first
  has links with and without auth, messages the app answers (send, broadcast), a drop and a relink, a
  join and a kick done by the app, an invalid frame, a requested unlink, a requested leave, and a close that
  keeps users (a deploy); the second brings bob back and closes the Krmx way.
- ``crash_log``: ``python -m lobby serve`` in a subprocess, killed with SIGKILL while alice and bob are
  linked, started again (it recovers both), bob relinks and talks, then SIGTERM. Its JSON log lines (debug
  level, so messages too) are kept next to it.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from freezegun import freeze_time

from lobby import Server

from .wsclient import Raw

ROOT = Path(__file__).resolve().parent.parent
START = datetime(2026, 11, 27, 21, 0, 0, tzinfo=timezone.utc)
_built: dict[str, Path] = {}


def us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def game_app(server: Server) -> Server:
    @server.on("message")
    def on_message(username, message):
        if message["type"] == "chat/say":
            server.broadcast({"type": "chat/said", "payload": {"from": username, "text": message.get("payload")}})
        elif message["type"] == "test/echo":
            server.send(username, {"type": "test/echoed", "payload": message.get("payload")})
        elif message["type"] == "admin/add-bot":
            server.join(message["payload"])
        elif message["type"] == "admin/kick":
            server.kick(message["payload"])

    return server


def make_game_server() -> Server:
    """A fresh, unstarted server with the game app (for redrive)."""
    return game_app(Server(ping_interval=None))


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _record_game(path: Path) -> None:
    with freeze_time(START, real_asyncio=True) as clock:
        seen: list = []

        async def settle(count: int) -> None:
            await until(lambda: len(seen) >= count, f"{count} events")

        def at(minutes: float) -> None:
            clock.move_to(START + timedelta(minutes=minutes))

        server = game_app(Server(port=0, db=str(path), ping_interval=None))
        server.on("event", seen.append)
        await server.start()  # 21:00 listen
        url = f"ws://127.0.0.1:{server.port}/"
        alice, bob = await Raw.open(url), await Raw.open(url)
        at(0.5)
        await alice.link("alice", auth="secret-token")  # join, link
        at(1)
        await bob.link("bob")  # join, link
        at(1.5)
        await alice.send({"type": "chat/say", "payload": "hi bob"})  # message, broadcast
        await settle(7)
        at(2)
        await alice.send({"type": "admin/add-bot", "payload": "carol"})  # message, join (by the app)
        await settle(9)
        at(2.5)
        await bob.send({"type": "test/echo", "payload": 1})  # message, send
        await settle(11)
        at(3)
        await bob.close()  # unlink dropped at 21:03
        await settle(12)
        at(3 + 4 / 60)
        bob = await Raw.open(url)
        await bob.link("bob")  # relink 4 s later
        await settle(13)
        at(4)
        await alice.send({"type": "admin/kick", "payload": "carol"})  # message, leave kick (carol unlinked)
        await settle(15)
        at(5)
        dave = await Raw.open(url)
        await dave.link("dave")  # join, link
        await settle(17)
        at(5.5)
        await dave.send_raw("not json")  # unlink invalid message
        await settle(18)
        at(6)
        await dave.link("dave")  # link again on the same connection
        await settle(19)
        at(6.5)
        await dave.send({"type": "krmx/leave"})  # unlink requested, leave requested
        await settle(21)
        at(7)
        await alice.send({"type": "krmx/unlink"})  # unlink requested
        await settle(22)
        at(7.5)
        await alice.link("alice", auth="secret-token")
        await settle(23)
        at(10)
        await server.close(keep_users=True)  # unlink alice, bob (server restart), close (server restart)
        for peer in (alice, bob, dave):
            await peer.close()

        at(60)
        seen.clear()
        server = game_app(Server(port=0, db=str(path), ping_interval=None))
        server.on("event", seen.append)
        await server.start()  # 22:00 listen; alice and bob are back, unlinked
        url = f"ws://127.0.0.1:{server.port}/"
        at(61)
        bob = await Raw.open(url)
        await bob.link("bob")
        at(62)
        await bob.send({"type": "chat/say", "payload": "anyone?"})
        await settle(4)
        at(65)
        await server.close()  # unlink bob (close), leave alice, bob (close), close
        await bob.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_process(db: Path, port: int, stderr) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "lobby", "serve", "--port", str(port), "--db", str(db), "--log-level", "debug"],
        cwd=ROOT, stderr=stderr, stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}")
            time.sleep(0.05)
    process.kill()
    raise AssertionError("server did not start")


async def _record_crash(db: Path, logfile: Path) -> None:
    with open(logfile, "wb") as logs:
        port = free_port()
        process = start_process(db, port, logs)
        try:
            alice, bob = await Raw.open(f"ws://127.0.0.1:{port}/"), await Raw.open(f"ws://127.0.0.1:{port}/")
            await alice.link("alice")
            await bob.link("bob")
            await alice.send({"type": "game/move", "payload": 1})
            await bob.send({"type": "game/move", "payload": 2})
            await alice.next()  # bob's linked: both links are committed
            await asyncio.sleep(0.2)  # the messages are committed too (no app answers them)
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            port = free_port()
            process = start_process(db, port, logs)  # listen, unlink alice and bob (recovered)
            bob = await Raw.open(f"ws://127.0.0.1:{port}/")
            await bob.link("bob")
            await bob.send({"type": "game/move", "payload": 3})
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)  # unlink bob (close), leave alice, bob (close), close
            assert process.wait(10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def _build(name: str, factory: Callable[[Path], None], root: Path) -> Path:
    if name not in _built:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        factory(folder)
        _built[name] = folder
    return _built[name]


@pytest.fixture(scope="session")
def game_log(tmp_path_factory) -> Path:
    """The two-session game log (read it only: it is shared by the whole test run)."""
    root = tmp_path_factory.getbasetemp()
    folder = _build("game-log", lambda folder: asyncio.run(_record_game(folder / "lobby.db")), root)
    return folder / "lobby.db"


@pytest.fixture(scope="session")
def crash_log(tmp_path_factory) -> tuple[Path, Path]:
    """The log (and the server's JSON log lines) of a session killed with SIGKILL and a restart."""
    root = tmp_path_factory.getbasetemp()
    folder = _build(
        "crash-log", lambda folder: asyncio.run(_record_crash(folder / "lobby.db", folder / "server.log")), root
    )
    return folder / "lobby.db", folder / "server.log"
