"""The example game lobby (``examples/table.py``) played by the bots (``examples/bots.py``), end to end.

The server runs in-process on a free port with its log in ``tmp_path`` and a short countdown; the bots are
real :class:`lobby.Client` objects. Afterwards the event log (read with ``EventStore.open_readonly``) must
hold the whole story. One test also runs both commands exactly as the README says, as processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from events import EventStore
from examples.bots import Bot, play
from examples.table import create_app
from lobby import Server

ROOT = Path(__file__).resolve().parent.parent
WAIT = 10.0
COUNTDOWN = 0.2


@pytest.fixture
async def table_server(tmp_path):
    server = create_app(countdown=COUNTDOWN, host="127.0.0.1", port=0, db=str(tmp_path / "lobby.db"),
                        ping_interval=None)
    await server.start()
    yield server
    if server.status == "listening":
        await server.close()


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def read_log(db: str) -> list[Any]:
    with EventStore.open_readonly(db) as store:
        return list(store.read())


def lifecycle(log: list[Any], username: str) -> list[tuple[str, str | None]]:
    return [(e.type, getattr(e, "reason", None)) for e in log
            if e.type in ("join", "link", "unlink", "leave") and getattr(e, "username", None) == username]


def requests(log: list[Any], username: str) -> list[str]:
    return [e.message["type"] for e in log if e.type == "message" and e.username == username]


def sent(log: list[Any], type_: str) -> list[tuple[int, str, Any]]:
    """``(seq, username, payload)`` of every ``send`` of a message of ``type_``."""
    return [(e.seq, e.username, e.message.get("payload")) for e in log if e.type == "send" and e.message["type"] == type_]


async def test_bots_play_a_full_session_and_the_log_tells_the_story(table_server):
    """Four bots and an intruder play a session: the log holds every join and link, the hellos, the kick,
    bot4's drop (reason ``dropped``) and its relink, the four ready requests, then the countdown and the game
    start sent to all four, then every leave; in that order."""
    story = await play(url(table_server), 4, timeout=WAIT, narrate=lambda line: None)
    await table_server.close()
    log = read_log(table_server.config.db)
    bots = ["bot1", "bot2", "bot3", "bot4"]

    assert [e.username for e in log if e.type == "join"] == [*bots, "intruder"]
    for bot in ("bot1", "bot2", "bot3"):
        assert lifecycle(log, bot) == [("join", None), ("link", None), ("unlink", "requested"), ("leave", "requested")]
    assert lifecycle(log, "bot4") == [("join", None), ("link", None), ("unlink", "dropped"), ("link", None),
                                      ("unlink", "requested"), ("leave", "requested")]
    assert lifecycle(log, "intruder") == [("join", None), ("link", None), ("unlink", "requested"), ("leave", "requested")]
    assert requests(log, "bot1") == ["table/join", "table/chat", "table/kick", "table/ready", "table/leave"]
    for bot in bots[1:]:
        assert requests(log, bot) == ["table/join", "table/chat", "table/ready", "table/leave"]
    assert requests(log, "intruder") == ["table/join"]
    chats = [e.message["payload"]["text"] for e in log if e.type == "message" and e.message["type"] == "table/chat"]
    assert chats == [f"hello from {bot}" for bot in bots]
    assert [(u, p) for _, u, p in sent(log, "table/kicked")] == [("intruder", {"table": "main", "by": "bot1"})]

    # While bot4 was away, the others were told it was disconnected.
    drop = next(e.seq for e in log if e.type == "unlink" and e.reason == "dropped")
    relink = next(e.seq for e in log if e.type == "link" and e.username == "bot4" and e.seq > drop)
    away = [(u, p) for seq, u, p in sent(log, "table/state") if drop < seq < relink]
    assert {u for u, _ in away} == {"bot1", "bot2", "bot3"}
    assert all({"username": "bot4", "ready": False, "connected": False} in p["players"] for _, p in away)

    # Ready, countdown, start: in that order, to all four, after bot4 came back.
    readies = [e.seq for e in log if e.type == "message" and e.message["type"] == "table/ready"]
    countdowns, starts = sent(log, "table/countdown"), sent(log, "table/started")
    assert sorted(u for _, u, _ in countdowns) == bots and sorted(u for _, u, _ in starts) == bots
    assert relink < min(readies) and max(readies) < min(s for s, _, _ in countdowns)
    assert max(s for s, _, _ in countdowns) < min(s for s, _, _ in starts)
    assert all(p == {"table": "main", "seconds": COUNTDOWN} for _, _, p in countdowns)
    assert all(p == {"table": "main", "players": bots} for _, _, p in starts)
    leaves = [e.seq for e in log if e.type == "leave" and e.username in bots]
    assert max(s for s, _, _ in starts) < min(leaves)
    assert log[-1].type == "close"

    assert "game started at main with bot1, bot2, bot3, bot4" in story
    assert any(line.startswith("bot4: relinked as bot4") for line in story)


async def _seated(server: Server, *names: str, table: str = "main") -> list[Bot]:
    bots = []
    for name in names:
        bot = Bot(name, timeout=WAIT, narrate=lambda line: None)
        await bot.client.connect(url(server))
        await bot.client.link(name)
        await bot.request("table/join", {"table": table})
        await bot.until(bot.sees(lambda s, n=name: n in [p["username"] for p in s["players"]]), "a seat")
        bots.append(bot)
    return bots


async def _error(bot: Bot, type_: str, payload: Any = None) -> str:
    before = len(bot.received("table/error"))
    await bot.request(type_, payload)
    errors = await bot.until(lambda: bot.received("table/error")[before:], f"an error for {type_}")
    assert errors[0]["request"] == type_
    return errors[0]["error"]


async def test_table_rules_refuse_what_they_should(table_server):
    """Only the host kicks; a kicked player cannot sit again; bad names, empty chats and requests without a
    table are refused with a ``table/error``; the host passes on when it leaves; a started game takes no
    one new."""
    host, guest, third = await _seated(table_server, "host", "guest", "third")
    assert host.state()["host"] == "host"
    assert await _error(guest, "table/kick", {"username": "third"}) == "only the host can kick"
    assert await _error(host, "table/kick", {"username": "host"}) == "the host cannot kick itself (leave instead)"
    assert await _error(host, "table/join", {"table": "bad name!"}) == "a table name is 1-32 letters, digits, - and _"
    assert await _error(host, "table/chat", {"text": "   "}) == "a chat text is 1-500 characters"
    assert await _error(host, "table/nonsense") == "unknown request"

    await host.request("table/kick", {"username": "third"})
    await third.until(lambda: third.received("table/kicked"), "the kick")
    assert await _error(third, "table/join", {"table": "main"}) == "you were kicked from main"
    assert await _error(third, "table/ready") == "you do not sit at a table"

    await host.request("table/leave")
    await guest.until(guest.sees(lambda s: s["host"] == "guest" and len(s["players"]) == 1), "guest as the host")

    fourth, = await _seated(table_server, "fourth")
    for bot in (guest, fourth):
        await bot.request("table/ready")
    await guest.until(lambda: guest.received("table/started"), "the game start")
    assert await _error(host, "table/join", {"table": "main"}) == "the game at main has started"


async def test_a_drop_cancels_the_countdown_until_the_player_is_back(tmp_path):
    """A player whose connection drops during the countdown cancels it (``<name> disconnected``); once its
    client relinked and everyone is still ready, the countdown starts again; an un-ready cancels it too."""
    server = create_app(countdown=30.0, host="127.0.0.1", port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    await server.start()
    try:
        alice, bob = await _seated(server, "alice", "bob")
        for bot in (alice, bob):
            await bot.request("table/ready")
        await alice.until(lambda: alice.received("table/countdown"), "the countdown")
        bob.client.drop()
        cancelled = await alice.until(lambda: alice.received("table/countdown-cancelled"), "the cancel")
        assert cancelled == [{"table": "main", "reason": "bob disconnected"}]
        await alice.until(lambda: len(alice.received("table/countdown")) == 2, "the countdown again")
        assert bob.client.status == "linked"
        await bob.until(lambda: bob.received("table/countdown"), "bob's countdown")
        await bob.request("table/ready", {"ready": False})
        await alice.until(lambda: len(alice.received("table/countdown-cancelled")) == 2, "the second cancel")
        assert alice.received("table/countdown-cancelled")[-1]["reason"] == "bob is not ready"
        assert alice.received("table/started") == []
        for bot in (alice, bob):
            await bot.client.disconnect(force=True)
    finally:
        await server.close()
    log = read_log(str(tmp_path / "lobby.db"))
    assert lifecycle(log, "bob")[:4] == [("join", None), ("link", None), ("unlink", "dropped"), ("link", None)]


async def _read_port(stream: asyncio.StreamReader) -> int:
    """The port from ``lobby serve``'s JSON ``listening`` line on stderr."""
    while line := await stream.readline():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "listening":
            return int(record["port"])
    raise AssertionError("lobby serve exited before listening")


@contextlib.asynccontextmanager
async def serving(app: str, db: Path, cwd: Path, env: dict[str, str]) -> AsyncIterator[int]:
    """``lobby serve APP`` as a process, on a free port (yielded); SIGTERM when done must stop it with 0."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lobby", "serve", app, "--port", "0", "--db", str(db), cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stderr is not None
        port = await asyncio.wait_for(_read_port(server.stderr), 20)
        drain = asyncio.create_task(server.stderr.read())
        yield port
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 10) == 0
        await drain
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


async def run_process(*args: str, cwd: Path, env: dict[str, str], timeout: float) -> tuple[str, str]:
    """Run a process to its end; its stdout and stderr, once it exited 0."""
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def test_the_readme_walkthrough_runs_as_processes(tmp_path):
    """``lobby serve examples.table:app`` and ``python -m examples.bots`` as processes, as the README says:
    the bots finish their session (exit 0, ``session complete``) and the server stops cleanly on SIGTERM."""
    env = {**os.environ, "TABLE_COUNTDOWN": str(COUNTDOWN), "PYTHONPATH": str(ROOT)}
    async with serving("examples.table:app", tmp_path / "t.db", ROOT, env) as port:
        out, _ = await run_process(sys.executable, "-m", "examples.bots", "--url", f"ws://127.0.0.1:{port}",
                                   "--players", "3", "--timeout", str(WAIT), cwd=ROOT, env=env, timeout=60)
        lines = out.splitlines()
        assert lines[-1] == "session complete"
        assert "game started at main with bot1, bot2, bot3" in lines
        assert "bot3: connection dropped" in lines
    log = read_log(str(tmp_path / "t.db"))
    assert lifecycle(log, "bot3")[2] == ("unlink", "dropped")
    assert log[-1].type == "close"


async def test_the_bots_wait_for_a_server_started_just_before_them(tmp_path):
    """The README starts the server in the background and the bots right after it: they connected before it
    listened and failed every time. They wait for it now (within ``--timeout``)."""
    from .test_server import free_port

    port = free_port()
    env = {**os.environ, "TABLE_COUNTDOWN": str(COUNTDOWN), "PYTHONPATH": str(ROOT)}
    bots = asyncio.create_task(run_process(
        sys.executable, "-m", "examples.bots", "--url", f"ws://127.0.0.1:{port}", "--players", "2", "--timeout", str(WAIT),
        cwd=ROOT, env=env, timeout=60))
    await asyncio.sleep(1.0)
    assert not bots.done()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lobby", "serve", "examples.table:app", "--port", str(port), "--db", str(tmp_path / "t.db"),
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await bots
        assert out.splitlines()[-1] == "session complete"
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 10) == 0


def _readme_block(after: str, language: str = "python") -> str:
    """The first ``language`` code block of the README after the line ``after``."""
    text = (ROOT / "README.md").read_text()
    rest = text[text.index(after) :]
    start = rest.index(f"```{language}\n") + len(f"```{language}\n")
    return rest[start : rest.index("```", start)]


async def test_the_readme_chat_app_answers_the_readme_python_client(tmp_path):
    """The README's chat app, served as it says (``lobby serve chat:app``), answers the README's Python client
    example, both copied from the README as they stand (only the port is a free one): the example once waited
    for ``chat/said`` from a plain ``lobby serve`` that never sends it."""
    (tmp_path / "chat.py").write_text(_readme_block("## Writing an app"))
    client = _readme_block("## Python client")
    assert 'client.connect("ws://127.0.0.1:9000")' in client
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    async with serving("chat:app", tmp_path / "chat.db", tmp_path, env) as port:
        (tmp_path / "client.py").write_text(client.replace("ws://127.0.0.1:9000", f"ws://127.0.0.1:{port}"))
        out, err = await run_process(sys.executable, str(tmp_path / "client.py"), cwd=tmp_path, env=env, timeout=30)
        assert err == ""
        assert "'type': 'chat/said', 'payload': {'from': 'alice', 'text': 'hello'}" in out
        assert out.splitlines()[-1] == "linked alice [{'username': 'alice', 'isLinked': True}]"
    log = read_log(str(tmp_path / "chat.db"))
    assert [e.type for e in log] == ["listen", "join", "broadcast", "link", "message", "broadcast", "unlink", "leave",
                                     "close"]
