"""The asyncio server over real websockets: write-ahead, the registry as a projection, hostile frames,
authentication, restart after a crash, logs without secrets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from events import EventLogError, EventStore, rebuild
from lobby import Server, ServerError
from lobby import server as server_module

from .factories import Events
from .wsclient import ACCEPTED, Raw, joined, left, linked, raw_linked, rejected, unlinked

ROOT = Path(__file__).resolve().parent.parent


def echo_app(server: Server) -> Server:
    @server.on("message")
    def on_message(username, message):
        if message["type"] == "test/echo":
            server.send(username, {"type": "test/echoed", "payload": message.get("payload")})
        elif message["type"] == "test/broadcast":
            server.broadcast({"type": "test/broadcasted", "payload": message.get("payload")})
        elif message["type"] == "test/fail":
            raise RuntimeError("the app broke")

    return server


@pytest.fixture
async def server(tmp_path):
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    await server.start()
    yield server
    if server.status == "listening":
        await server.close()


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/"


def log_registry(path: Path):
    with EventStore.open_readonly(path) as store:
        return rebuild(store.read())


def assert_projection(server: Server) -> None:
    """The live registry equals the fold of the log."""
    assert server.core.registry == log_registry(Path(server.config.db))


# -- the basics over a socket -------------------------------------------------------------------------------


async def test_link_burst_and_broadcasts_over_websockets(server):
    alice = await Raw.open(url(server))
    assert await alice.link("alice") == [ACCEPTED, joined("alice"), linked("alice")]
    bob = await Raw.open(url(server))
    assert await bob.link("bob") == [ACCEPTED, joined("alice"), linked("alice"), joined("bob"), linked("bob")]
    await alice.expect(joined("bob"), linked("bob"))
    await bob.send({"type": "test/broadcast", "payload": 1})
    await alice.expect({"type": "test/broadcasted", "payload": 1})
    await bob.expect({"type": "test/broadcasted", "payload": 1})
    await bob.close()
    await alice.expect(unlinked("bob"))
    assert server.users == [{"username": "alice", "isLinked": True}, {"username": "bob", "isLinked": False}]
    assert_projection(server)


async def test_every_event_is_in_the_log_in_order(server):
    alice = await Raw.open(url(server))
    await alice.link("alice", auth="token")
    await alice.echo("x")
    await alice.send({"type": "krmx/leave"})
    await alice.expect(unlinked("alice"), left("alice"))
    with EventStore.open_readonly(server.config.db) as store:
        events = list(store.read())
    assert [(e.type, getattr(e, "username", None)) for e in events] == [
        ("listen", None),
        ("join", "alice"),
        ("link", "alice"),
        ("message", "alice"),
        ("send", "alice"),
        ("unlink", "alice"),
        ("leave", "alice"),
    ]
    assert events[2].auth is True
    assert events[3].message == {"type": "test/echo", "payload": "x"}
    assert [e.seq for e in events] == list(range(1, 8))
    assert {e.session for e in events} == {server.session}


# -- write-ahead ----------------------------------------------------------------------------------------------


async def test_no_frame_is_sent_before_its_event_is_committed(server):
    """While a commit is held back (the loop blocked in append), the peer receives nothing of that turn."""
    alice = await Raw.open(url(server))
    await alice.link("alice")
    store = server.store
    real_append = store.append
    seen_during_commit: list[list] = []

    def held_append(events, **options):
        # Give a wrongly ordered server every chance to have written the frame already.
        time.sleep(0.3)
        seen_during_commit.append([e.type for e in events])
        return real_append(events, **options)

    real_sync = store.sync

    def held_sync():
        time.sleep(0.3)  # nor may a frame leave before the turn's events are synced to disk
        seen_during_commit.append("sync")
        return real_sync()

    store.append = held_append
    store.sync = held_sync
    listener_calls: list[int] = []
    server.on("message", lambda username, message: listener_calls.append(server.store.last_seq))
    await alice.send({"type": "test/echo", "payload": 1})
    reply = await alice.next()
    assert reply == {"type": "test/echoed", "payload": 1}
    assert seen_during_commit == [["message"], ["send"], "sync"]
    # The listener ran after the message event was committed: the log already held it.
    with EventStore.open_readonly(server.config.db) as log:
        message_seq = next(e.seq for e in log.read(types=["message"]))
    assert listener_calls == [message_seq]


async def test_a_failed_commit_sends_nothing_and_stops_the_server(server):
    """If the log cannot be written, no frame of that turn goes out and no listener sees the event."""
    alice = await Raw.open(url(server))
    await alice.link("alice")
    called = []
    server.on("message", lambda username, message: called.append(message))

    def broken_append(events, **options):
        raise OSError("disk full")

    server.store.append = broken_append
    await alice.send({"type": "test/echo", "payload": 1})
    assert await alice.closed()
    assert alice.ws.close_code == 1006  # aborted: not even a close frame leaves a server that cannot log
    assert called == []
    assert isinstance(server.fatal, OSError)
    await asyncio.wait_for(server.wait_closed(), 5)  # a program that started the server learns of it
    assert server.status == "closed"


async def test_a_start_that_cannot_write_its_listen_event_never_says_listening(tmp_path, monkeypatch):
    """Monitoring keys on `listening`: a start whose first write failed (a full disk) said it, then exited."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))

    def broken_append(self, events, **options):
        raise OSError("disk full")

    monkeypatch.setattr(EventStore, "append", broken_append)
    with capture_logs() as logs, pytest.raises(ServerError, match="the event log could not be written: disk full"):
        await server.start()
    assert [line["event"] for line in logs] == ["event log schema", "event log append failed; stopping without sending this turn"]
    assert server.status == "closed"


@pytest.mark.parametrize("how", ["deleted", "moved", "replaced"])
async def test_a_log_file_deleted_or_replaced_under_the_server_stops_it(tmp_path, monkeypatch, how):
    """`rm lobby.db` under a running server: it wrote on to the deleted file, healthy and unnoticed, and every
    event since was gone at the exit. Now it stops, as for a disk that is full, and says why. A log moved (an
    archive by hand) keeps its last events: SQLite left them in a stray -wal, which the next start threw away."""
    monkeypatch.setattr(server_module, "LOG_FILE_CHECK_INTERVAL", 0.02)
    db = tmp_path / "lobby.db"
    server = echo_app(Server(port=0, db=str(db), ping_interval=None))
    with capture_logs() as logs:
        await server.start()
        alice = await Raw.open(url(server))
        await alice.link("alice")
        if how == "deleted":
            db.unlink()
        elif how == "moved":
            db.rename(tmp_path / "archived.db")
        else:
            with EventStore(tmp_path / "other.db") as other:
                other.append([Events().listen()])
            os.replace(tmp_path / "other.db", db)
        await asyncio.wait_for(server.wait_closed(), 5)
        assert await alice.closed()
    said = {"deleted": "was moved or deleted", "moved": "was moved or deleted", "replaced": "was replaced by another file"}
    assert server.status == "closed" and said[how] in str(server.fatal)
    assert [(line["event"], line["error"]) for line in logs if line["log_level"] == "critical"] == [
        ("event log file gone; stopping", f"{db}: {said[how]} while the log was open")
    ]
    if how == "moved":
        with EventStore.open_readonly(tmp_path / "archived.db") as archived:
            assert [(e.type, getattr(e, "username", None)) for e in archived.read()][-2:] == [
                ("join", "alice"), ("link", "alice")]
        EventStore(db).close()  # nothing of it is left at the old path: a new log starts there


async def test_a_log_moved_while_a_reader_holds_it_says_where_its_last_events_are(tmp_path, monkeypatch):
    """A reader (a replay of the live log) keeps the checkpoint from folding everything into the moved file: the
    server waited 5 s on it, blocking its loop, then said nothing, and the events stayed in the stray -wal."""
    monkeypatch.setattr(server_module, "LOG_FILE_CHECK_INTERVAL", 0.02)
    db = tmp_path / "lobby.db"
    server = echo_app(Server(port=0, db=str(db), ping_interval=None))
    with capture_logs() as logs:
        await server.start()
        alice = await Raw.open(url(server))
        await alice.link("alice")
        reader = sqlite3.connect(db)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchall()
        await (await Raw.open(url(server))).link("bob")  # after the reader's snapshot
        db.rename(tmp_path / "archived.db")
        started = time.monotonic()
        await asyncio.wait_for(server.wait_closed(), 10)
        assert time.monotonic() - started < 2
        reader.close()
    [line] = [line for line in logs if line["event"] == "event log not folded into the moved file"]
    assert line["log_level"] == "error" and f"{db}-wal" in line["hint"]
    with pytest.raises(EventLogError, match="it holds the last events"):
        EventStore(db)  # the stray -wal is kept for them, not thrown away by a new log


async def test_a_relative_log_path_stays_the_same_file_after_the_app_changes_directory(tmp_path, monkeypatch):
    """`lobby serve`'s default ./lobby.db: the file check looked for the path in the new working directory and
    stopped a healthy server as if its log had been deleted."""
    monkeypatch.setattr(server_module, "LOG_FILE_CHECK_INTERVAL", 0.02)
    monkeypatch.chdir(tmp_path)
    server = echo_app(Server(port=0, db="lobby.db", ping_interval=None))
    await server.start()
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        os.chdir(elsewhere)
        await asyncio.sleep(0.2)
        assert server.status == "listening" and server.fatal is None
        alice = await Raw.open(url(server))
        assert (await alice.link("alice"))[0] == ACCEPTED
    finally:
        await server.close()


async def test_a_log_gone_while_serve_closes_ends_with_1_and_no_closed_line(tmp_path, monkeypatch):
    monkeypatch.setattr(server_module, "LOG_FILE_CHECK_INTERVAL", 0.02)
    db = tmp_path / "lobby.db"
    server = Server(port=0, db=str(db), ping_interval=None)

    @server.on("close")
    async def save_game() -> None:
        db.unlink()  # while the close waits for this listener
        await asyncio.sleep(0.3)

    with capture_logs() as logs:
        serving = asyncio.ensure_future(server.serve())
        while server.status != "listening":
            await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(serving, 10) == 1
    events = [line["event"] for line in logs]
    assert "event log file gone; stopping" in events and "closed" not in events


async def test_serve_cancelled_in_the_middle_of_its_close_finishes_it(tmp_path):
    """Cancelled while its close waited for a listener, the server stayed closing, its log open and its lobby
    locked."""
    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None)

    @server.on("close")
    async def save_game() -> None:
        await asyncio.sleep(3)

    serving = asyncio.ensure_future(server.serve())
    while server.status != "listening":
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    while server.status != "closing":
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert server.status == "closed" and server.store is None
    again = Server(port=0, db=db, ping_interval=None)
    await again.start()  # the lobby is free
    await again.close()


async def test_a_log_failing_at_the_close_exits_1_not_as_a_usage_error(tmp_path, monkeypatch):
    """A log that fails while the server runs ends the process with 1, however late: at the close too (the
    disk filled up meanwhile), not with 2, which tells of a bad flag or a log that cannot be used."""
    db = tmp_path / "lobby.db"
    server = Server(port=0, db=str(db), ping_interval=None)
    serving = asyncio.ensure_future(server.serve())
    while server.status != "listening":
        await asyncio.sleep(0.01)

    def disk_full(events, **options):
        raise OSError("disk full")

    monkeypatch.setattr(server.store, "append", disk_full)
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(serving, 5) == 1
    assert server.status == "closed" and isinstance(server.fatal, OSError)


async def test_send_and_broadcast_take_any_mapping(server):
    """They are typed Mapping (a TypedDict message type-checks): an OrderedDict or a MappingProxyType was
    refused at run time as 'not a dict'."""
    import collections
    import types

    alice = await Raw.open(url(server))
    await alice.link("alice")
    server.send("alice", collections.OrderedDict(type="app/one", payload=1))
    server.broadcast(types.MappingProxyType({"type": "app/two", "payload": 2}))
    assert [await alice.next(), await alice.next()] == [{"type": "app/one", "payload": 1}, {"type": "app/two", "payload": 2}]


async def test_serve_returns_once_the_app_closes_the_server_itself(tmp_path):
    """Game over: the app awaits close() and serve() returns 0 (it waited for a stop signal for ever)."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    serving = asyncio.ensure_future(server.serve())
    while server.status != "listening":
        await asyncio.sleep(0.01)
    await server.close()
    assert await asyncio.wait_for(serving, 5) == 0


@pytest.mark.parametrize("keep_users", [False, True])
async def test_a_cancelled_serve_closes_the_server_on_the_way_out(tmp_path, keep_users):
    """A TaskGroup whose other task failed cancels serve(): the server closes (as asyncio's serve_forever
    does), rather than stay listening with its users linked, its lobby locked and no close in the log."""
    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None)
    serving = asyncio.ensure_future(server.serve(keep_users_on_stop=keep_users))
    while server.status != "listening":
        await asyncio.sleep(0.01)
    alice = await Raw.open(url(server))
    await alice.link("alice")
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    await asyncio.wait_for(alice.ws.wait_closed(), 5)
    assert server.status == "closed"
    with EventStore.open_readonly(db) as store:
        assert [(e.type, getattr(e, "reason", None)) for e in store.read()][-1] == (
            "close", "server restart" if keep_users else "close"
        )
    again = Server(port=0, db=db, ping_interval=None)  # the lobby is not locked any more
    await again.start()
    assert [user["isLinked"] for user in again.users] == ([False] if keep_users else [])
    await again.close()


async def test_the_conformance_app_exits_1_when_its_log_fails(tmp_path, monkeypatch):
    """It waited for SIGTERM alone, so it hung with its port closed; then SIGTERM gave a traceback."""
    import argparse

    from examples import conformance

    started: list[Server] = []
    build = conformance.build
    monkeypatch.setattr(conformance, "build", lambda server: started.append(build(server)) or started[-1])
    args = argparse.Namespace(host="127.0.0.1", port=0, no_new_users=False, durability="full", prejoin=[])
    serving = asyncio.ensure_future(conformance.serve(args, str(tmp_path / "lobby.db")))
    while not started or started[0].status != "listening":
        await asyncio.sleep(0.01)
    server = started[0]
    alice = await Raw.open(url(server))
    await alice.link("alice")

    def broken_append(events, **options):
        raise OSError("disk full")

    server.store.append = broken_append
    await alice.send({"type": "conf/echo", "payload": 1})
    assert await asyncio.wait_for(serving, 5) == 1


# -- the registry is a projection ---------------------------------------------------------------------------


async def test_live_registry_equals_the_log_after_a_busy_scenario(server):
    clients = {}
    for name in ("ann", "bob", "cy"):
        clients[name] = await Raw.open(url(server))
        await clients[name].link(name)
    server.join("dee")
    server.kick("bob")
    server.unlink("cy")
    await clients["ann"].send({"type": "krmx/unlink"})
    await clients["ann"].link("dee")
    await clients["cy"].close()
    await clients["ann"].echo()
    assert [u["username"] for u in server.users] == ["ann", "cy", "dee"]
    assert_projection(server)


# -- hostile frames -------------------------------------------------------------------------------------------

HOSTILE = [
    ("not JSON", "this is { not json", rejected("invalid message")),
    ("an array", "[1, 2]", rejected("invalid message")),
    ("a number", "42", rejected("invalid message")),
    ("a string", '"krmx/link"', rejected("invalid message")),
    ("null", "null", rejected("invalid message")),
    ("type missing", '{"payload": 1}', rejected("invalid message")),
    ("type not a string", '{"type": ["krmx/link"]}', rejected("invalid message")),
    ("NaN", '{"type": "krmx/link", "payload": NaN}', rejected("invalid message")),
    ("deep nesting", '{"type": "x", "payload": ' + "[" * 5000 + "]" * 5000 + "}", rejected("invalid message")),
    ("link payload a list", '{"type": "krmx/link", "payload": []}', rejected("invalid link request")),
    ("link username a number", '{"type": "krmx/link", "payload": {"username": 1, "version": "0.5.4"}}',
     rejected("invalid link request")),
    ("link version missing", '{"type": "krmx/link", "payload": {"username": "eve"}}',
     rejected("invalid link request")),
    ("link auth null", '{"type": "krmx/link", "payload": {"username": "eve", "version": "0.5.4", "auth": null}}',
     rejected("invalid link request")),
    ("binary frame of garbage", b"\xff\xfe\x00", rejected("invalid message")),
    ("binary frame of a custom message", b'{"type": "game/move"}', rejected("unlinked connection")),
    ("unknown krmx type before linking", '{"type": "krmx/boom"}', rejected("unlinked connection")),
    ("custom message before linking", '{"type": "game/move", "payload": {}}', rejected("unlinked connection")),
]


@pytest.mark.parametrize(("frame", "answer"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
async def test_hostile_frames_from_an_unlinked_connection(server, frame, answer):
    """Each bad frame gets its answer; the connection stays usable; a linked client keeps being served."""
    honest = await Raw.open(url(server))
    await honest.link("honest")
    hostile = await Raw.open(url(server))
    await hostile.send_raw(frame)
    assert await hostile.next() == answer
    await honest.echo("still served")
    assert await hostile.link("eve") == [ACCEPTED, joined("honest"), linked("honest"), joined("eve"), linked("eve")]
    assert_projection(server)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "invalid message"),
        (b"\x00\x01", "invalid message"),
        ('{"type": "krmx/whatever"}', "reserved type"),
        ('{"type": "krmx/link", "payload": {"username": "x", "version": "0.5.4"}}', "link while linked"),
        ('{"type": "krmx/unlink"}', "requested"),
        # orjson reads 1024 levels but writes 254: logging this one would fail and stop the server
        ('{"type": "game/deep", "payload": ' + "[" * 300 + "]" * 300 + "}", "invalid message"),
    ],
    ids=lambda value: repr(value)[:40],
)
async def test_hostile_frames_from_a_linked_connection_unlink_it(server, frame, reason):
    honest = await Raw.open(url(server))
    await honest.link("honest")
    hostile = await Raw.open(url(server))
    await hostile.link("eve")
    await honest.expect(joined("eve"), linked("eve"))
    await hostile.send_raw(frame)
    await hostile.expect(unlinked("eve"))
    await honest.expect(unlinked("eve"))
    await honest.echo()
    with EventStore.open_readonly(server.config.db) as store:
        last = list(store.read(types=["unlink"]))[-1]
    assert (last.username, last.reason) == ("eve", reason)


async def test_a_frame_over_the_size_limit_closes_only_that_connection(tmp_path):
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, max_frame_size=64 * 1024))
    await server.start()
    try:
        honest = await Raw.open(url(server))
        await honest.link("honest")
        hostile = await Raw.open(url(server))
        await hostile.link("eve")
        await honest.expect(joined("eve"), linked("eve"))
        await hostile.send({"type": "game/huge", "payload": "x" * (64 * 1024)})
        assert await hostile.closed()
        assert hostile.ws.close_code == 1009
        await honest.expect(unlinked("eve"))
        await honest.echo()
        with EventStore.open_readonly(server.config.db) as store:
            assert list(store.read(types=["unlink"]))[-1].reason == "frame too large"
    finally:
        await server.close()


async def test_frames_sent_with_the_upgrade_request_are_handled_after_the_handshake(server):
    """A client may send its link in the same packet as its upgrade request (before the 101): the frame
    waits for the handshake, then links, and the connection counts once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    link = orjson.dumps({"type": "krmx/link", "payload": {"username": "early", "version": "0.5.4"}})
    writer.write(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + Frame(Opcode.TEXT, link).serialize(mask=True, extensions=[])
    )
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101")
    frame = await asyncio.wait_for(reader.readexactly(2), 5)
    body = await asyncio.wait_for(reader.readexactly(frame[1]), 5)
    assert orjson.loads(body) == ACCEPTED
    for _ in range(50):
        if server.users == [{"username": "early", "isLinked": True}]:
            break
        await asyncio.sleep(0.02)
    assert server.users == [{"username": "early", "isLinked": True}]
    assert server.metrics.health()["connections"] == 1
    writer.close()
    for _ in range(50):
        if server.metrics.health()["connections"] == 0:
            break
        await asyncio.sleep(0.02)
    assert server.metrics.health()["connections"] == 0
    assert server.users == [{"username": "early", "isLinked": False}]


async def test_frames_beyond_max_buffer_before_the_handshake_cut_the_connection_off(tmp_path):
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, max_buffer=1024,
                    max_frame_size=1024)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        frame = Frame(Opcode.TEXT, b'{"type":"x/y","payload":"' + b"z" * 700 + b'"}').serialize(mask=True, extensions=[])
        writer.write(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" + frame * 3
        )
        assert await asyncio.wait_for(reader.read(), 5) == b""  # aborted before any answer
        assert server.metrics.cutoffs == {"flood during handshake": 1}
        assert server.metrics.health()["connections"] == 0
        writer.close()
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("data", "mask"), [(b'{"type": "test/echo"}', False), (b'{"type": "test/echo", "p": "caf\xe9"}', True)],
    ids=["unmasked (1002)", "not UTF-8 (1007)"],
)
async def test_a_peer_that_ignores_the_close_after_a_protocol_error_is_cut_within_the_close_timeout(server, data, mask):
    """An unmasked frame (1002) or a text frame that is not UTF-8 (1007) fails the connection: a peer that
    neither answers the close nor closes TCP is dropped after websockets' close timeout (2 s), not at the next
    ping (or never, without pings)."""
    reader, writer = await raw_linked(server.port, "deaf")
    for _ in range(50):
        if server.users == [{"username": "deaf", "isLinked": True}]:
            break
        await asyncio.sleep(0.02)
    writer.write(Frame(Opcode.TEXT, data).serialize(mask=mask, extensions=[]))
    # The server sends its close frame and half-closes; this peer reads it but never answers nor closes.
    for _ in range(250):
        if server.users == [{"username": "deaf", "isLinked": False}]:
            break
        await asyncio.sleep(0.02)
    assert server.users == [{"username": "deaf", "isLinked": False}]
    assert server.metrics.health()["connections"] == 0
    assert server.metrics.cutoffs == {"protocol error": 1}
    writer.close()


async def test_a_lone_surrogate_escape_is_echoed_as_the_replacement_character(server):
    """As JSON.stringify writes half an emoji; the reference passes it on, we read it as U+FFFD."""
    alice = await Raw.open(url(server))
    await alice.link("alice")
    await alice.send_raw('{"type": "test/echo", "payload": "hi \\ud83d"}')
    assert await alice.next() == {"type": "test/echoed", "payload": "hi \ufffd"}
    with EventStore.open_readonly(server.config.db) as store:
        assert list(store.read(types=["message"]))[-1].message["payload"] == "hi \ufffd"


async def test_a_text_frame_that_is_not_utf8_fails_the_connection_and_a_binary_one_reads_as_replacement(server):
    """RFC 6455: a text message must be UTF-8, else the connection fails with 1007 (the reference closes it
    so too); a binary frame's bytes that are not UTF-8 read as U+FFFD, as the reference reads them."""
    frame = b'{"type": "test/echo", "payload": "caf\xe9 \xc3\xa9"}'
    alice, bob = await Raw.open(url(server)), await Raw.open(url(server))
    await alice.link("alice")
    await bob.link("bob")
    await alice.expect({"type": "krmx/joined", "payload": {"username": "bob"}},
                       {"type": "krmx/linked", "payload": {"username": "bob"}})
    await bob.send_raw(frame)  # binary
    assert await bob.next() == {"type": "test/echoed", "payload": "caf\ufffd \u00e9"}
    await alice.ws.send(frame, text=True)
    with pytest.raises(ConnectionClosed) as closed:
        await alice.next()
    assert closed.value.rcvd.code == 1007
    assert await bob.next() == {"type": "krmx/unlinked", "payload": {"username": "alice"}}
    with EventStore.open_readonly(server.config.db) as store:
        assert [e.message["payload"] for e in store.read(types=["message"])] == ["caf\ufffd \u00e9"]
        # not "dropped", as a network loss is: a client build with a bug must show
        assert [(e.type, e.reason) for e in store.read(types=["cutoff", "unlink"])][-2:] == [
            ("cutoff", "protocol error"), ("unlink", "protocol error")]


async def test_frames_of_4_mib_are_handled_by_default(server):
    alice = await Raw.open(url(server))
    await alice.link("alice")
    big = "y" * (4 * 1024 * 1024 - 100)
    await alice.send({"type": "test/echo", "payload": big})
    assert await alice.next() == {"type": "test/echoed", "payload": big}


async def test_an_app_exception_is_logged_with_its_traceback_and_serving_goes_on(server):
    alice = await Raw.open(url(server))
    await alice.link("alice")
    with capture_logs() as logs:
        await alice.send({"type": "test/fail"})
        await alice.echo()
    failures = [line for line in logs if line["event"] == "listener failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "error" and failures[0]["exc_info"] is True


async def test_a_dict_the_app_changes_after_broadcasting_it_is_logged_as_sent_and_serving_goes_on(server):
    """A listener that keeps building its dict after the call (into a NaN, which JSON cannot hold) changes
    neither the frame nor the record, which is committed after the listener returns."""

    @server.on("message")
    def keep_building(username, message):
        if message["type"] == "test/start":
            state = {"type": "test/started", "payload": {"round": 1}}
            server.broadcast(state)
            state["payload"]["round"] = 2
            state["payload"]["score"] = float("nan")

    alice = await Raw.open(url(server))
    await alice.link("alice")
    await alice.send({"type": "test/start"})
    assert await alice.next() == {"type": "test/started", "payload": {"round": 1}}
    await alice.echo()
    assert server.status == "listening" and server.fatal is None
    with EventStore.open_readonly(server.config.db) as store:
        broadcasts = [event.message for event in store.read() if event.type == "broadcast"]
    assert broadcasts == [{"type": "test/started", "payload": {"round": 1}}]


async def test_every_link_rejection_is_logged_once_with_its_reason_user_and_connection(server):
    """On Saturday, "why can't alice log in" is answered by the log: each rejection, the core's and the app's."""

    @server.on("authenticate")
    def authenticate(username, info):
        if username == "mallory":
            raise PermissionError("banned")

    alice = await Raw.open(url(server))
    await alice.link("alice")
    other = await Raw.open(url(server))
    with capture_logs() as logs:
        assert await other.link("alice") == [rejected("user alice is already linked to a connection")]
        assert await other.link("bob", version="0.4.0") == [
            rejected("krmx server version mismatch (server=0.5.*|0.6.*,client=0.4.0)")]
        assert await other.link("mallory") == [rejected("banned")]
        assert await other.link("x" * 200) == [rejected("invalid username")]
        await other.send_raw("not json")
        assert await other.next() == rejected("invalid message")
    lines = [line for line in logs if line["event"] == "link rejected"]
    assert [(line["username"], line["reason"]) for line in lines] == [
        ("alice", "user alice is already linked to a connection"),
        ("bob", "krmx server version mismatch (server=0.5.*|0.6.*,client=0.4.0)"),
        ("mallory", "banned"),
        ("x" * 64 + "...", "invalid username"),
        (None, "invalid message"),
    ]
    assert {line["connection"] for line in lines} == {"c2"}
    assert all(line["remote"].startswith("127.0.0.1:") for line in lines)


async def test_a_snapshot_that_cannot_be_written_does_not_cost_the_turn(tmp_path, monkeypatch):
    """A snapshot is derived data: a full disk while writing one is a warning, and the turn's listeners run
    and its frames leave as usual (it was a traceback, and the turn was dropped)."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, snapshot_every=1))
    await server.start()
    try:
        def disk_full(registry):
            raise sqlite3.OperationalError("database or disk is full")

        monkeypatch.setattr(server.store, "save_snapshot", disk_full)
        alice = await Raw.open(url(server))
        with capture_logs() as logs:
            assert (await alice.link("alice"))[0] == ACCEPTED
            await alice.echo("after the failed snapshot")
        warnings = [line for line in logs if line["event"] == "snapshot not written"]
        assert warnings and warnings[0]["error"] == "database or disk is full"
        assert server.users == [{"username": "alice", "isLinked": True}]
    finally:
        await server.close()


async def test_the_start_line_tells_the_version_durability_limits_and_a_schema_change(tmp_path):
    """Which mode and limits a session ran with, and that a log was created or migrated, is in the log."""
    db = str(tmp_path / "lobby.db")
    for expected_schema in (["m001_events", "m002_snapshots", "m003_type_codes_only"], None):  # a new log, then the same log again
        server = Server(port=0, db=db, ping_interval=None, durability="normal", max_connections=77)
        with capture_logs() as logs:
            await server.start()
        await server.close()
        listening = next(line for line in logs if line["event"] == "listening")
        assert listening["durability"] == "normal" and listening["version"]
        assert listening["limits"]["max_connections"] == 77 and listening["limits"]["ping_interval"] is None
        schema = [line["applied"] for line in logs if line["event"] == "event log schema"]
        assert schema == ([expected_schema] if expected_schema else [])


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Wire:
    """A websocket client on a bare socket: frames sent together go out in one write, so the server reads
    them together and handles them in one turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: Server) -> Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(HANDSHAKE)
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101")
        return cls(reader, writer)

    def send(self, *messages: dict) -> None:
        self.writer.write(
            b"".join(Frame(Opcode.TEXT, orjson.dumps(m)).serialize(mask=True, extensions=[]) for m in messages)
        )

    async def next(self) -> Any:
        head = await asyncio.wait_for(self.reader.readexactly(2), 5)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await self.reader.readexactly(2), "big")
        assert head[0] == 0x81, head  # a final text frame
        return orjson.loads(await self.reader.readexactly(length))

    async def expect(self, *frames: Any) -> None:
        assert [await self.next() for _ in frames] == list(frames)


def link_frame(username: str) -> dict:
    return {"type": "krmx/link", "payload": {"username": username, "version": "0.5.4"}}


@pytest.fixture
async def ordered(server):
    """The echo app, plus a greeting on every link and a kick on request."""

    @server.on("link")
    def greet(username):
        server.send(username, {"type": "test/greeting", "payload": username})

    @server.on("message")
    def kick(username, message):
        if message["type"] == "test/kick":
            server.kick(message["payload"])

    return server


async def _linked_wires(server: Server, *names: str) -> list[Wire]:
    wires = []
    for name in names:
        wire = await Wire.open(server)
        wire.send(link_frame(name))
        await wire.expect(ACCEPTED, *[frame for other in names[: len(wires) + 1] for frame in (joined(other), linked(other))])
        for earlier in wires:
            await earlier.expect(joined(name), linked(name))
        wires.append(wire)
    return wires


async def test_a_leave_and_another_connections_unlink_in_one_turn_are_not_interleaved(server):
    """One frame's messages are sent before those of anything handled later (the conformance processing
    model): a leave's unlinked and left came apart, the other connection's unlinked between them, and bob,
    unlinked by then, never heard that alice left."""
    alice, bob, obs = await _linked_wires(server, "alice", "bob", "obs")
    alice.send({"type": "krmx/leave"})
    bob.send({"type": "krmx/unlink"})  # written before the server's loop reads either: one turn
    await obs.expect(unlinked("alice"), left("alice"), unlinked("bob"))
    await bob.expect(unlinked("alice"), left("alice"), unlinked("bob"))


async def test_a_leave_is_not_split_by_what_an_earlier_frames_listener_sends(server):
    """alice's message (its listener broadcasts) and bob's leave in one turn: the broadcast came between bob's
    unlinked and left. A frame that may go on in later steps waits for the frames before it to end, their
    listeners' calls included, as the reference handles them one at a time; the log has the frames' order."""
    alice, bob, obs = await _linked_wires(server, "alice", "bob", "obs")
    before = server.core.registry.seq
    alice.send({"type": "test/broadcast", "payload": 1})
    bob.send({"type": "krmx/leave"})
    await obs.expect({"type": "test/broadcasted", "payload": 1}, unlinked("bob"), left("bob"))
    await bob.expect({"type": "test/broadcasted", "payload": 1}, unlinked("bob"), left("bob"))
    with EventStore.open_readonly(server.config.db) as store:
        assert [(e.type, getattr(e, "username", None)) for e in store.read(before + 1)] == [
            ("message", "alice"), ("broadcast", None), ("unlink", "bob"), ("leave", "bob"),
        ]


async def test_a_link_to_a_user_whose_leave_came_first_in_the_turn_is_accepted(server):
    """The link came after the leave: the user had left, so the name is free (it was refused as 'already
    linked' while the leave's second step waited for the next stage of the turn)."""
    alice, obs = await _linked_wires(server, "alice", "obs")
    newcomer = await Wire.open(server)
    alice.send({"type": "krmx/leave"})
    newcomer.send(link_frame("alice"))
    await newcomer.expect(ACCEPTED, joined("obs"), linked("obs"), joined("alice"), linked("alice"))
    await obs.expect(unlinked("alice"), left("alice"), joined("alice"), linked("alice"))


async def test_a_new_users_join_and_link_are_not_split_by_another_frame_of_the_turn(server):
    dave, obs = await _linked_wires(server, "dave", "obs")
    carol = await Wire.open(server)
    carol.send(link_frame("carol"))
    dave.send({"type": "krmx/unlink"})
    await obs.expect(joined("carol"), linked("carol"), unlinked("dave"))


@pytest.mark.parametrize(
    ("burst", "answers"),
    [
        ([{"type": "test/echo", "payload": 1}, {"type": "krmx/unlink"}],
         [{"type": "test/echoed", "payload": 1}, unlinked("alice")]),
        ([{"type": "test/kick", "payload": "alice"}, link_frame("alice")],
         [unlinked("alice"), left("alice"), ACCEPTED, joined("alice"), linked("alice"),
          {"type": "test/greeting", "payload": "alice"}]),
        ([{"type": "test/kick", "payload": "alice"}, {"type": "test/echo", "payload": 1}],
         [unlinked("alice"), left("alice"), rejected("unlinked connection")]),
        ([{"type": "krmx/unlink"}, link_frame("bob"), {"type": "krmx/unlink"}],
         [unlinked("alice"), ACCEPTED, joined("alice"), joined("bob"), linked("bob"),
          {"type": "test/greeting", "payload": "bob"}, unlinked("bob")]),
    ],
    ids=["echo then unlink", "kicked then link", "kicked then echo", "unlink, link, unlink"],
)
async def test_frames_read_together_are_handled_in_order_each_after_the_listeners_of_the_last(
    ordered, burst, answers
):
    """KRMX.md: a connection's frames are handled strictly in order. Frames that arrive together meet the
    state the listeners of the frame before them left, as one at a time would: the echo is answered before
    the unlink, the kicked connection's link is a new link, its echo is from an unlinked connection."""
    alice = await Wire.open(ordered)
    alice.send(link_frame("alice"))
    await alice.expect(ACCEPTED, joined("alice"), linked("alice"), {"type": "test/greeting", "payload": "alice"})
    alice.send(*burst)
    await alice.expect(*answers)
    assert_projection(ordered)


@pytest.mark.parametrize("existing", [False, True], ids=["new user", "existing user"])
async def test_frames_behind_a_pending_authentication_are_handled_in_order_after_the_link(ordered, existing):
    """Frames that wait in the core behind an async authentication are handled one at a time too, the
    first after the link's listeners: the greeting, then the echo, then the unlink."""

    @ordered.on("authenticate")
    async def slow(username, info):
        await asyncio.sleep(0.2)

    if existing:
        ordered.join("alice")
    alice = await Wire.open(ordered)
    alice.send(link_frame("alice"), {"type": "test/echo", "payload": 1}, {"type": "krmx/unlink"})
    await alice.expect(ACCEPTED, joined("alice"), linked("alice"), {"type": "test/greeting", "payload": "alice"},
                       {"type": "test/echoed", "payload": 1}, unlinked("alice"))
    assert_projection(ordered)


async def test_frames_behind_a_pending_authentication_drain_a_share_per_turn(ordered):
    """Behind a slow authentication a burst piles up; it is handled TURN_SHARE frames per turn at most, like
    a burst in the inbox, so that other connections are not held up by all of it; in order all the same."""

    @ordered.on("authenticate")
    async def slow(username, info):
        await asyncio.sleep(0.2)

    turn, drains = [0], []
    real_turn, real_drain = ordered._turn, ordered.core.drain

    def counted_turn() -> None:
        turn[0] += 1
        real_turn()

    def counted_drain(connection):
        drains.append(turn[0])
        return real_drain(connection)

    ordered._turn, ordered.core.drain = counted_turn, counted_drain
    alice = await Wire.open(ordered)
    alice.send(link_frame("alice"), *({"type": "test/echo", "payload": n} for n in range(100)))
    await alice.expect(ACCEPTED, joined("alice"), linked("alice"), {"type": "test/greeting", "payload": "alice"},
                       *({"type": "test/echoed", "payload": n} for n in range(100)))
    per_turn = Counter(drains)
    assert sum(per_turn.values()) == 100 and max(per_turn.values()) <= server_module.TURN_SHARE


async def test_a_close_waits_for_the_frames_read_before_it_that_drain_over_several_turns(tmp_path):
    """A backlog behind a slow authentication drains a share per turn; the client's close, read after the
    backlog, is held behind the rest of it instead of dropping it."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    seen: list[int] = []

    @server.on("authenticate")
    async def slow(username, info):
        await asyncio.sleep(0.2)

    @server.on("message")
    def count(username, message):
        seen.append(message["payload"])

    await server.start()
    try:
        alice = await Wire.open(server)
        alice.send(link_frame("alice"), *({"type": "test/echo", "payload": n} for n in range(990)))
        await alice.expect(ACCEPTED, joined("alice"), linked("alice"))
        alice.writer.close()
        for _ in range(100):
            if server.users == [{"username": "alice", "isLinked": False}]:
                break
            await asyncio.sleep(0.05)
        assert seen == list(range(990))
        assert server.users == [{"username": "alice", "isLinked": False}]
        assert_projection(server)
    finally:
        await server.close()


async def test_the_flood_bound_holds_until_every_frame_queued_behind_a_link_is_handled(tmp_path):
    """Queued links start new authentications: the bytes still queued behind them count against max_buffer
    until the queue is empty (the count went back to 0 at each authentication, so the queue grew forever)."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, max_buffer=4096,
                             max_frame_size=1024))

    @server.on("authenticate")
    async def slow(username, info):
        await asyncio.sleep(0.2)

    await server.start()
    try:
        alice = await Wire.open(server)
        alice.send(link_frame("alice"))
        pad = {"type": "test/pad", "payload": "p" * 900}
        for _ in range(10):
            alice.send(*[{"type": "krmx/unlink"}, link_frame("alice")] * 2, pad, pad, pad)
            await asyncio.sleep(0.2)
            if server.metrics.cutoffs:
                break
        assert server.metrics.cutoffs == {"flood during authentication": 1}
    finally:
        await server.close()


async def test_a_stale_queued_count_is_dropped_once_nothing_waits_behind_a_link(tmp_path):
    """A frame that arrived as an authentication ended may be counted, then handled with nothing queued in the
    core: the count must not linger and cut an honest client off as a flood later."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, max_buffer=4096,
                             max_frame_size=1024))
    await server.start()
    try:
        alice = await Raw.open(url(server))
        await alice.link("alice")
        [ws] = await server_side(server, 1)
        ws.lobby_queued = 3000  # as left by that race
        for n in range(5):
            await alice.echo("e" * 900 + str(n))
        assert server.metrics.cutoffs == {} and ws.lobby_queued == 0
    finally:
        await server.close()


async def test_event_times_never_go_back_when_the_clock_steps_back(tmp_path):
    """A clock stepped back (NTP, a restored VM) must not put earlier times after later ones in the log:
    time queries search it by time. Within a session and across a restart, each event takes the later of
    the clock and the last recorded time."""
    now = [1_000_000_000]
    db = str(tmp_path / "lobby.db")
    server = echo_app(Server(port=0, db=db, ping_interval=None, clock=lambda: now[0]))
    await server.start()
    alice = await Raw.open(url(server))
    await alice.link("alice")
    now[0] -= 600_000_000  # ten minutes back
    await alice.echo("after the step")
    now[0] += 1
    await alice.echo("later")
    await server.close(keep_users=True)
    now[0] -= 600_000_000
    again = Server(port=0, db=db, ping_interval=None, clock=lambda: now[0])
    await again.start()
    await again.close()
    with EventStore.open_readonly(db) as store:
        times = [event.at for event in store.read()]
    assert times == sorted(times) and times[0] == 1_000_000_000 and len(set(times)) == 1


# -- authentication ------------------------------------------------------------------------------------------


async def test_authenticate_rejects_with_the_exception_message(server):
    @server.on("authenticate")
    def authenticate(username, info):
        if info.auth != "open sesame":
            raise PermissionError("wrong password")

    client = await Raw.open(url(server))
    assert await client.link("alice", auth="guess") == [rejected("wrong password")]
    assert (await client.link("alice", auth="open sesame"))[0] == ACCEPTED


@pytest.mark.parametrize("is_async", [False, True])
async def test_authenticate_raising_rejects_with_the_message_and_logs_what_may_be_a_bug(server, is_async):
    """KRMX.md rule 8: an exception's message is the reason. A PermissionError of the app's own is a rejection
    on purpose (no log line of its own); anything else (1/0, or a PermissionError from the system, with an
    errno) may be a bug: a warning with its traceback."""

    def check(username):
        if username == "bob":
            return 1 / 0
        if username == "ann":
            raise PermissionError(13, "Permission denied", "/srv/keys/hmac.pem")
        if username == "eve":
            raise PermissionError("no eves")

    if is_async:
        async def authenticate(username, info):
            check(username)
    else:
        def authenticate(username, info):
            check(username)
    server.on("authenticate", authenticate)
    client = await Raw.open(url(server))
    with capture_logs() as logs:
        assert await client.link("bob") == [rejected("division by zero")]
        assert await client.link("ann") == [rejected("[Errno 13] Permission denied: '/srv/keys/hmac.pem'")]
        assert await client.link("eve") == [rejected("no eves")]
    warned = [line for line in logs if line["log_level"] == "warning"]
    assert [(line["username"], type(line["exc_info"])) for line in warned] == [
        ("bob", ZeroDivisionError), ("ann", PermissionError),
    ]
    assert all(line["event"].startswith("authenticate raised") for line in warned)
    assert (await client.link("carl"))[0] == ACCEPTED


async def test_async_authenticate_times_out(tmp_path):
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, auth_timeout=0.2)

    @server.on("authenticate")
    async def authenticate(username, info):
        await asyncio.sleep(5)

    await server.start()
    try:
        client = await Raw.open(url(server))
        assert await client.link("alice") == [rejected("authentication timeout")]
        assert server.users == []
    finally:
        await server.close()


async def test_async_authenticate_rechecks_what_changed_meanwhile(tmp_path):
    """Two connections authenticate the same user at once: only the first one links."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)

    @server.on("authenticate")
    async def authenticate(username, info):
        await asyncio.sleep(0.1)

    await server.start()
    try:
        first, second = await Raw.open(url(server)), await Raw.open(url(server))
        await first.send({"type": "krmx/link", "payload": {"username": "alice", "version": "0.5.4"}})
        await second.send({"type": "krmx/link", "payload": {"username": "alice", "version": "0.5.4"}})
        assert await first.next() == ACCEPTED
        assert await second.next() == rejected("user alice is already linked to a connection")
        assert server.users == [{"username": "alice", "isLinked": True}]
        assert_projection(server)
    finally:
        await server.close()


async def test_a_turn_takes_a_share_of_one_connections_burst_and_leaves_the_rest_for_the_next(tmp_path):
    """A thousand frames read at once from one connection: this turn handles TURN_SHARE of them, in order,
    beside the other connections' frames, and the rest waits (after the loop reads the sockets again)."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    for index in range(1000):
        server._submit("flood", lambda index=index: index)
    server._submit("honest", lambda: "hi")
    rounds = server._take_inputs()
    assert len(rounds) == server_module.TURN_SHARE
    assert [connection for connection, _ in rounds[0]] == ["flood", "honest"]
    assert [action() for actions in rounds for connection, action in actions if connection == "flood"] == list(
        range(server_module.TURN_SHARE)
    )
    assert len(server._inbox["flood"]) == 1000 - server_module.TURN_SHARE and "honest" not in server._inbox


async def test_a_frame_queued_behind_a_link_waits_for_the_leave_a_link_listener_started(tmp_path):
    """A link listener kicks the user whose frames waited behind its authentication: the leave ends (its own
    krmx/left right after krmx/unlinked, KRMX.md) before the next waiting frame is handled."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)

    @server.on("authenticate")
    async def authenticate(username, info):
        await asyncio.sleep(0.1)

    @server.on("link")
    def no_kickers(username):
        if username.startswith("kick"):
            server.kick(username)

    await server.start()
    try:
        client = await Raw.open(url(server))
        await client.send({"type": "krmx/link", "payload": {"username": "kickme", "version": "0.5.4"}})
        await client.send({"type": "krmx/unlink"})  # waits behind the link
        await client.expect(ACCEPTED, joined("kickme"), linked("kickme"), unlinked("kickme"), left("kickme"),
                            rejected("unlinked connection"))
        assert server.users == []
        assert_projection(server)
    finally:
        await server.close()


async def test_close_cancels_the_authentications_still_running(tmp_path):
    """An async authenticate waiting on something slow (a token service) is cancelled at close: it does not
    go on running against a closed lobby."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @server.on("authenticate")
    async def authenticate(username, info):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await server.start()
    client = await Raw.open(url(server))
    await client.send({"type": "krmx/link", "payload": {"username": "alice", "version": "0.5.4"}})
    await asyncio.wait_for(started.wait(), 5)
    await server.close()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert await client.closed()


async def test_snapshots_every_n_events_and_at_close(tmp_path):
    """A snapshot once snapshot_every events were appended since the last, and one at close (so the next start
    folds nothing)."""
    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None, snapshot_every=3)
    await server.start()  # listen: 1 event
    server.join("ann")
    with EventStore.open_readonly(db) as store:
        assert [row[0] for row in store.db.execute("SELECT seq FROM snapshots")] == []
    server.join("bob")  # the 3rd event
    with EventStore.open_readonly(db) as store:
        assert [row[0] for row in store.db.execute("SELECT seq FROM snapshots")] == [3]
    server.join("cy")
    await server.close()  # leaves of ann, bob and cy (5 to 7), close (8)
    with EventStore.open_readonly(db) as store:
        assert [row[0] for row in store.db.execute("SELECT seq FROM snapshots ORDER BY seq")] == [3, 6, 8]
        assert store.last_seq == 8


# -- server calls -------------------------------------------------------------------------------------------


async def test_server_calls_raise_clear_errors(server):
    with pytest.raises(ServerError, match="does not exist"):
        server.kick("ghost")
    server.join("bob")
    with pytest.raises(ServerError, match="already exists"):
        server.join("bob")
    with pytest.raises(ServerError, match="invalid username"):
        server.join("-no-")
    with pytest.raises(ServerError, match="not linked"):
        server.send("bob", {"type": "x/y"})
    with pytest.raises(ServerError, match="not linked"):
        server.unlink("bob")
    with pytest.raises(ServerError, match="reserved"):
        server.broadcast({"type": "krmx/joined"})
    for call in (lambda: server.join(["a"]), lambda: server.kick(["a"]), lambda: server.unlink({}),
                 lambda: server.send(["a"], {"type": "x/y"})):
        with pytest.raises(ServerError, match="username"):
            call()
    with pytest.raises(ServerError, match="skip is one username"):
        server.broadcast({"type": "x/y"}, skip=["bob"])
    await server.close()
    with pytest.raises(ServerError, match="closed"):
        server.join("carol")


async def test_close_kicks_everyone_in_join_order_and_logs_close(tmp_path):
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    await server.start()
    server.join("zed")
    alice = await Raw.open(url(server))
    await alice.link("alice")
    await server.close()
    await alice.expect(left("zed"), unlinked("alice"), left("alice"))
    assert await alice.closed()
    with EventStore.open_readonly(tmp_path / "lobby.db") as store:
        assert [(e.type, getattr(e, "reason", None)) for e in store.read(4)] == [
            ("link", None), ("leave", "close"), ("unlink", "close"), ("leave", "close"), ("close", "close"),
        ]
        assert store.sessions()[0].closed


def users_app(server: Server) -> Server:
    """Listeners that tell everyone what they saw: the users at each unlink and leave."""
    for name in ("unlink", "leave"):
        def tell(username: str, name: str = name) -> None:
            server.broadcast({"type": f"app/{name}", "payload": {"who": username, "users": server.users}})
        server.on(name, tell)
    return server


async def test_unlink_listeners_of_a_kick_run_before_the_leave_as_in_the_reference(tmp_path):
    """A kick (or a krmx/leave) unlinks, runs the unlink listeners, then leaves: they see the user still in
    the lobby, unlinked, and what they send reaches the others before krmx/left."""
    server = users_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    await server.start()
    try:
        alice, bob = await Raw.open(url(server)), await Raw.open(url(server))
        await alice.link("alice")
        await bob.link("bob")
        await alice.expect(joined("bob"), linked("bob"))
        server.kick("alice")
        alice_unlinked = [{"username": "alice", "isLinked": False}, {"username": "bob", "isLinked": True}]
        await bob.expect(
            unlinked("alice"),
            {"type": "app/unlink", "payload": {"who": "alice", "users": alice_unlinked}},
            left("alice"),
            {"type": "app/leave", "payload": {"who": "alice", "users": [{"username": "bob", "isLinked": True}]}},
        )
        await bob.send({"type": "krmx/leave"})
        await bob.expect(unlinked("bob"), left("bob"))
        assert_projection(server)
    finally:
        await server.close()


async def test_at_close_each_users_listeners_reach_the_users_still_linked(tmp_path):
    """close() takes the users one at a time, as the reference does: the leave listeners of the first
    users broadcast to (and send to) the later ones, who are still linked."""
    server = users_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))

    @server.on("leave")
    def farewell(username: str) -> None:
        if username == "alice":
            server.send("bob", {"type": "app/dm", "payload": "alice is gone"})

    await server.start()
    alice, bob = await Raw.open(url(server)), await Raw.open(url(server))
    await alice.link("alice")
    await bob.link("bob")
    await alice.expect(joined("bob"), linked("bob"))
    await server.close()
    await bob.expect(
        unlinked("alice"),
        {"type": "app/unlink", "payload": {"who": "alice", "users": [{"username": "alice", "isLinked": False},
                                                                     {"username": "bob", "isLinked": True}]}},
        left("alice"),
        {"type": "app/leave", "payload": {"who": "alice", "users": [{"username": "bob", "isLinked": True}]}},
        {"type": "app/dm", "payload": "alice is gone"},
        unlinked("bob"),
        left("bob"),
    )
    assert await bob.closed()
    with EventStore.open_readonly(tmp_path / "lobby.db") as store:
        kinds = ["unlink", "leave", "send", "broadcast", "close"]
        assert [(e.type, getattr(e, "username", None)) for e in store.read(types=kinds)] == [
            ("unlink", "alice"), ("broadcast", None), ("leave", "alice"), ("broadcast", None), ("send", "bob"),
            ("unlink", "bob"), ("broadcast", None), ("leave", "bob"), ("broadcast", None), ("close", None),
        ]


async def test_close_waits_for_async_listeners_and_cancels_them_after_the_grace(tmp_path, monkeypatch):
    """A close listener that saves the game (async) finishes before close() returns; one that outlasts
    LISTENER_GRACE is cancelled with a warning naming it, not silently by the loop's shutdown."""
    monkeypatch.setattr(server_module, "LISTENER_GRACE", 0.5)
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    saved: list[str] = []

    @server.on("close")
    async def save_game() -> None:
        await asyncio.sleep(0.1)
        saved.append("game")

    @server.on("leave")
    async def never_done(username: str) -> None:
        await asyncio.sleep(60)
        saved.append(username)

    await server.start()
    server.join("zed")
    with capture_logs() as logs:
        started = time.monotonic()
        await server.close()
    assert saved == ["game"]
    assert time.monotonic() - started < 5
    cancelled = [entry for entry in logs if entry["event"] == "listener cancelled at close"]
    assert [entry["listener"] for entry in cancelled] == [
        "leave listener test_close_waits_for_async_listeners_and_cancels_them_after_the_grace.<locals>.never_done"
    ]
    # Tied to the close event (replay logs --around-seq shows it there).
    [close] = [entry for entry in logs if entry["event"] == "close"]
    assert cancelled[0]["seq"] == close["seq"]


async def test_close_lets_the_async_listeners_still_running_end_before_the_users_are_kicked(tmp_path):
    """A move whose listener awaits (a dice service) when the lobby closes: it ends first, so its reply reaches
    the player before the kick, and the close listener that saves the game sees the move."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    game = {"score": 0}
    started = asyncio.Event()
    saved: list[dict[str, int]] = []

    @server.on("message")
    async def move(username: str, message: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(0.2)
        game["score"] += 10
        server.send(username, {"type": "dice/applied"})

    @server.on("close")
    def save_game() -> None:
        saved.append(dict(game))

    await server.start()
    alice = await Raw.open(url(server))
    await alice.link("alice")
    await alice.send({"type": "dice/roll"})
    await asyncio.wait_for(started.wait(), 5)
    with capture_logs() as logs:
        await server.close()
    assert saved == [{"score": 10}]
    await alice.expect({"type": "dice/applied"}, unlinked("alice"), left("alice"))
    assert not [entry for entry in logs if entry["log_level"] in ("warning", "error")]
    with EventStore.open_readonly(tmp_path / "lobby.db") as store:
        assert [event.type for event in store.read()][-5:] == ["message", "send", "unlink", "leave", "close"]


async def test_a_close_cancelled_while_listeners_end_is_logged_all_the_same(tmp_path):
    """serve() cancelled (a TaskGroup whose other task failed) while close() waits for a listener: the lobby
    is closed and the log ends with its close, as without the wait."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    started = asyncio.Event()

    @server.on("message")
    async def slow(username: str, message: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(60)

    serving = asyncio.ensure_future(server.serve())
    while server.status != "listening":
        await asyncio.sleep(0.01)
    alice = await Raw.open(url(server))
    await alice.link("alice")
    await alice.send({"type": "app/slow"})
    await asyncio.wait_for(started.wait(), 5)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.2)
    assert server.status == "closing" and not serving.done()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert server.status == "closed"
    with EventStore.open_readonly(tmp_path / "lobby.db") as store:
        assert [event.type for event in store.read()][-3:] == ["unlink", "leave", "close"]


async def test_close_goes_on_without_a_cancelled_listener_that_does_not_end(tmp_path, monkeypatch):
    """A listener whose clean-up on cancellation takes long (a stuck save) holds the close for
    LISTENER_CANCEL_GRACE at most, with an error naming it; the log is closed with the session's close."""
    monkeypatch.setattr(server_module, "LISTENER_GRACE", 0.2)
    monkeypatch.setattr(server_module, "LISTENER_CANCEL_GRACE", 0.3)
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)

    @server.on("leave")
    async def slow_to_stop(username: str) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # saving on the way out, stuck
            raise

    await server.start()
    server.join("zed")
    with capture_logs() as logs:
        await asyncio.wait_for(server.close(), 10)
    assert server.status == "closed"
    stuck = [entry for entry in logs if entry["event"].startswith("listener still running after its cancellation")]
    assert [entry["listener"] for entry in stuck] == [
        "leave listener test_close_goes_on_without_a_cancelled_listener_that_does_not_end.<locals>.slow_to_stop"
    ]
    with EventStore.open_readonly(tmp_path / "lobby.db") as store:
        assert [event.type for event in store.read()][-1] == "close"


async def test_close_called_by_an_async_listener_completes(tmp_path, monkeypatch):
    """An admin command that stops the lobby: close() does not wait for (or cancel) the listener calling it."""
    monkeypatch.setattr(server_module, "LISTENER_GRACE", 5)
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    closed = asyncio.Event()

    @server.on("message")
    async def stop(username, message):
        await server.close()
        closed.set()

    await server.start()
    alice = await Raw.open(url(server))
    await alice.link("alice")
    await alice.send({"type": "admin/stop"})
    await asyncio.wait_for(closed.wait(), 3)
    assert server.status == "closed" and server.store is None


async def test_the_apps_lines_logged_with_server_log_name_the_lobby_and_session(tmp_path):
    """'I was kicked for no reason': the app's line saying why is found with the server's by
    `lobby replay logs -s SESSION -u USER`, which reads the lobby, session and username fields."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), lobby="dice", ping_interval=None)

    @server.on("listen")
    def ready(port: int) -> None:
        server.log.info("tables loaded", tables=3)

    with capture_logs() as logs:
        await server.start()
        server.join("idler")
        server.log.info("kicking idle player", username="idler", strikes=2)
        server.kick("idler")
        await server.close()
    app_lines = [line for line in logs if line["event"] in ("tables loaded", "kicking idle player")]
    assert [(line["event"], line["lobby"], line["session"]) for line in app_lines] == [
        ("tables loaded", "dice", server.session), ("kicking idle player", "dice", server.session),
    ]


async def test_close_keeping_users_brings_them_back_unlinked(tmp_path):
    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None)
    await server.start()
    alice = await Raw.open(url(server))
    await alice.link("alice")
    server.join("bob")
    await server.close(keep_users=True)
    restarted = Server(port=0, db=db, ping_interval=None)
    await restarted.start()
    try:
        assert restarted.users == [{"username": "alice", "isLinked": False}, {"username": "bob", "isLinked": False}]
        again = await Raw.open(url(restarted))
        assert await again.link("alice") == [ACCEPTED, joined("alice"), linked("alice")]
        await again.expect(joined("bob"))
    finally:
        await restarted.close()
    with EventStore.open_readonly(db) as store:
        unlinks = [(e.username, e.reason) for e in store.read(types=["unlink"])]
        closes = [e.reason for e in store.read(types=["close"])]
    assert unlinks[0] == ("alice", "server restart")
    assert closes[0] == "server restart"


# -- crash and restart ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_process(db: Path, port: int, stderr, *flags: str, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "lobby", "serve", "--port", str(port), "--db", str(db), "--log-level", "debug",
         *flags],
        cwd=ROOT, stderr=stderr, stdout=subprocess.DEVNULL, env=env,
    )
    wait_for_port(process, port)
    return process


def wait_for_port(process: subprocess.Popen, port: int) -> None:
    """Return once ``port`` accepts connections; fail if ``process`` exits or 20 s pass."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}")
            time.sleep(0.05)
    process.kill()
    raise AssertionError("server did not start")


async def test_after_kill_9_a_restart_restores_users_unlinked_and_a_client_relinks(tmp_path):
    db = tmp_path / "lobby.db"
    logs = open(tmp_path / "server.log", "wb")
    port = free_port()
    process = start_process(db, port, logs)
    try:
        alice, bob = await Raw.open(f"ws://127.0.0.1:{port}/"), await Raw.open(f"ws://127.0.0.1:{port}/")
        await alice.link("alice", auth="hunter2-secret")
        await bob.link("bob")
        await alice.expect(joined("bob"), linked("bob"))
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        port = free_port()
        process = start_process(db, port, logs)
        with EventStore.open_readonly(db) as store:
            sessions = store.sessions()
            assert [s.closed for s in sessions] == [False, False]
            restart = list(store.read(sessions[1].first_seq))
        assert [(e.type, getattr(e, "username", None), getattr(e, "reason", None)) for e in restart] == [
            ("listen", None, None), ("unlink", "alice", "recovered"), ("unlink", "bob", "recovered"),
        ]
        again = await Raw.open(f"ws://127.0.0.1:{port}/")
        assert await again.link("bob") == [ACCEPTED, joined("alice"), joined("bob"), linked("bob")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        logs.close()
    # The auth string is in neither the log nor the log lines.
    assert b"hunter2-secret" not in db.read_bytes()
    for suffix in ("-wal", "-shm"):
        if Path(str(db) + suffix).exists():
            assert b"hunter2-secret" not in Path(str(db) + suffix).read_bytes()
    lines = (tmp_path / "server.log").read_bytes()
    assert b"hunter2-secret" not in lines
    records = [orjson.loads(line) for line in lines.splitlines() if line.startswith(b"{")]
    link_lines = [r for r in records if r.get("event") == "link"]
    assert link_lines and all({"lobby", "session", "seq", "username"} <= r.keys() for r in link_lines)
    # the restart says it at warning level, for alerts: at info, "recovering": true was all
    [crash] = [r for r in records if r.get("event") == "previous session ended without a close"]
    assert (crash["level"], crash["previous_session"], crash["unlinked"]) == ("warning", sessions[0].session, 2)
    assert os.path.exists(db)


# -- liveness and the handshake -------------------------------------------------------------------------------


async def test_a_missed_pong_unlinks_the_user_with_reason_ping_timeout(tmp_path):
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=0.2))
    await server.start()
    try:
        honest = await Raw.open(url(server))
        await honest.link("honest")
        silent = await Raw.open(url(server))
        await silent.link("silent")
        await honest.expect(joined("silent"), linked("silent"))
        silent.ws.transport.pause_reading()  # it no longer reads the server's pings, so it never answers
        await honest.expect(unlinked("silent"))
        with EventStore.open_readonly(server.config.db) as store:
            last = list(store.read(types=["unlink"]))[-1]
        assert (last.username, last.reason) == ("silent", "ping timeout")
    finally:
        await server.close()


async def test_required_query_parameters_and_path_are_checked_before_the_upgrade(tmp_path):
    from websockets.exceptions import InvalidStatus

    server = echo_app(
        Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, path="/play",
               query_params={"game": "chess", "token": True, "debug": False, "room": lambda v: v is not None and v.isdigit()})
    )
    await server.start()
    base = f"ws://127.0.0.1:{server.port}"
    try:
        for bad, status in [
            ("/play?game=chess&token=1&room=7&debug=1", 403),
            ("/play?game=go&token=1&room=7", 403),
            ("/play?game=chess&room=7", 403),
            ("/play?game=chess&token=1&room=x", 403),
            ("/?game=chess&token=1&room=7", 404),
        ]:
            with pytest.raises(InvalidStatus) as refused:
                await Raw.open(base + bad)
            assert refused.value.response.status_code == status, bad
        assert server.metrics.refused == {"query parameter 'debug' is not valid": 1, "query parameter 'game' is not valid": 1,
                                          "query parameter 'token' is not valid": 1, "query parameter 'room' is not valid": 1,
                                          "not found": 1}
        good = await Raw.open(base + "/play?game=chess&token=&room=7")
        assert (await good.link("alice"))[0] == ACCEPTED
    finally:
        await server.close()


async def test_a_deploy_stop_keeps_the_users_and_the_next_start_brings_them_back(tmp_path):
    """LOBBY_ON_STOP=keep: SIGTERM unlinks everyone with reason 'server restart', logs close with that
    reason, exits 0; the next start has the same users, unlinked, and a client relinks."""
    db = tmp_path / "lobby.db"
    port = free_port()
    with open(tmp_path / "server.log", "wb") as logs:
        process = start_process(db, port, logs, env={**os.environ, "LOBBY_ON_STOP": "keep"})
        try:
            alice = await Raw.open(f"ws://127.0.0.1:{port}/")
            await alice.link("alice")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 10) == 0
            await alice.expect(unlinked("alice"))
            process = start_process(db, port, logs)
            again = await Raw.open(f"ws://127.0.0.1:{port}/")
            assert await again.link("alice") == [ACCEPTED, joined("alice"), linked("alice")]
        finally:
            process.kill()
    with EventStore.open_readonly(db) as store:
        first, second = store.sessions()
        stop = list(store.read(first.first_seq, first.last_seq))
    assert [(e.type, getattr(e, "reason", None)) for e in stop[-2:]] == [
        ("unlink", "server restart"), ("close", "server restart"),
    ]
    assert first.closed and second.counts == {"listen": 1, "link": 1}


async def test_with_compression_on_frames_go_through_permessage_deflate(tmp_path):
    """compression=True negotiates permessage-deflate (browsers offer it) and frames still arrive intact."""
    server = echo_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, compression=True))
    await server.start()
    try:
        alice = await Raw.open(url(server), compression="deflate")
        assert "permessage-deflate" in (alice.ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        await alice.link("alice")
        await alice.send({"type": "test/broadcast", "payload": "x" * 5000})
        assert await alice.next() == {"type": "test/broadcasted", "payload": "x" * 5000}
    finally:
        await server.close()


async def test_without_compression_the_offer_is_declined_like_the_reference(server):
    alice = await Raw.open(url(server), compression="deflate")
    assert alice.ws.response.headers.get("Sec-WebSocket-Extensions") is None
    assert (await alice.link("alice"))[0] == ACCEPTED


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_frames_written_directly_are_what_websockets_would_write(size):
    from websockets.frames import Frame, Opcode

    from lobby.connection import text_frame

    data = b"x" * size
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])


# -- the order clients see is the order of the log ----------------------------------------------------------


def frame_text(message: dict) -> str:
    return orjson.dumps(message).decode()


async def server_side(server: Server, count: int) -> list:
    """The server's connections, oldest first, once ``count`` of them are open."""
    for _ in range(200):
        connections = sorted(server._ws_server.connections, key=lambda ws: int(ws.lobby_label[1:]))
        if len(connections) >= count and all(ws.lobby_label for ws in connections):
            return connections
        await asyncio.sleep(0.01)
    raise AssertionError("connections did not open")


def as_frames(events) -> list:
    """What a linked bystander sees of these events, in their order."""
    seen = {"join": joined, "link": linked, "unlink": unlinked, "leave": left}
    return [seen[e.type](e.username) for e in events if e.type in seen]


async def test_two_new_users_linking_in_one_turn_reach_others_in_log_order(server):
    """Each link is handled whole before the next frame (the conformance processing model: one frame's
    messages are never split by another's), and a bystander gets the frames in the log's order."""
    alice = await Raw.open(url(server))
    await alice.link("alice")
    carol, bob = await Raw.open(url(server)), await Raw.open(url(server))
    _, carol_ws, bob_ws = await server_side(server, 3)
    before = server.core.registry.seq
    # Both frames reach the server's input before its next turn: one turn takes both.
    server._frame(carol_ws, frame_text({"type": "krmx/link", "payload": {"username": "carol", "version": "0.5.4"}}))
    server._frame(bob_ws, frame_text({"type": "krmx/link", "payload": {"username": "bob", "version": "0.5.4"}}))
    received = [await alice.next() for _ in range(4)]
    with EventStore.open_readonly(server.config.db) as store:
        logged = list(store.read(before + 1))
    assert [(e.type, e.username) for e in logged] == [("join", "carol"), ("link", "carol"), ("join", "bob"), ("link", "bob")]
    assert received == as_frames(logged)
    await carol.close()
    await bob.close()


async def test_a_listeners_join_and_a_sync_authenticated_link_of_that_user_in_one_turn_stay_in_order(tmp_path):
    """Found by a fuzzer: alice's listener joins carol while carol's link (sync authenticate) is in the same
    turn. Committing what the listener did after the link's steps logged link before join: a log that did
    not fold, and bystanders got linked before joined."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    server.on("authenticate", lambda username, info: None)

    @server.on("message")
    def add(username, message):
        server.join(message["payload"])

    await server.start()
    try:
        alice = await Raw.open(url(server))
        await alice.link("alice")
        carol = await Raw.open(url(server))
        alice_ws, carol_ws = await server_side(server, 2)
        before = server.core.registry.seq
        server._frame(alice_ws, frame_text({"type": "app/add", "payload": "carol"}))
        server._frame(carol_ws, frame_text({"type": "krmx/link", "payload": {"username": "carol", "version": "0.5.4"}}))
        received = [await alice.next() for _ in range(2)]
        with EventStore.open_readonly(server.config.db) as store:
            logged = list(store.read(before + 1))
            assert rebuild(store.read()).users == server.core.registry.users
        assert [(e.type, getattr(e, "username", None)) for e in logged] == [
            ("message", "alice"), ("join", "carol"), ("link", "carol"),
        ]
        assert received == as_frames(logged) == [joined("carol"), linked("carol")]
        await carol.close()
    finally:
        await server.close()


async def test_calls_of_a_sync_authenticate_listener_join_its_turn(tmp_path):
    """A broadcast made while authenticating is committed and sent in the turn's order, after what the
    turn recorded before it."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)

    @server.on("authenticate")
    def announce(username, info):
        if username == "bob":
            server.broadcast({"type": "app/auth", "payload": username})

    await server.start()
    try:
        alice, carol = await Raw.open(url(server)), await Raw.open(url(server))
        await alice.link("alice")
        await carol.link("carol")
        await alice.expect(joined("carol"), linked("carol"))
        bob = await Raw.open(url(server))
        _, carol_ws, bob_ws = await server_side(server, 3)
        before = server.core.registry.seq
        server._frame(carol_ws, frame_text({"type": "krmx/unlink"}))
        server._frame(bob_ws, frame_text({"type": "krmx/link", "payload": {"username": "bob", "version": "0.5.4"}}))
        received = [await alice.next() for _ in range(4)]
        with EventStore.open_readonly(server.config.db) as store:
            logged = [(e.type, getattr(e, "username", None)) for e in store.read(before + 1)]
        assert logged == [("unlink", "carol"), ("broadcast", None), ("join", "bob"), ("link", "bob")]
        assert received == [unlinked("carol"), {"type": "app/auth", "payload": "bob"}, joined("bob"), linked("bob")]
        await bob.close()
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("returned", "reason"),
    [(False, "authentication failed"), ("no bobs here", "no bobs here"), (0, "authentication failed"),
     (PermissionError("x"), "authentication failed")],
)
async def test_authenticate_returning_anything_but_none_or_true_rejects(tmp_path, returned, reason):
    """Only None or True accept: a listener that returns False or a reason (or something odd) instead of
    raising does not let the user in."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    server.on("authenticate", lambda username, info: True if username == "ok" else returned)
    await server.start()
    try:
        client = await Raw.open(url(server))
        assert await client.link("bob") == [rejected(reason)]
        assert (await client.link("ok"))[0] == ACCEPTED
    finally:
        await server.close()


async def test_async_authenticate_returning_false_rejects(tmp_path):
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)

    @server.on("authenticate")
    async def check(username, info):
        return username != "bob"

    await server.start()
    try:
        client = await Raw.open(url(server))
        assert await client.link("bob") == [rejected("authentication failed")]
        assert (await client.link("ann"))[0] == ACCEPTED
    finally:
        await server.close()


async def test_a_call_from_another_thread_is_refused_and_the_server_goes_on(server):
    alice = await Raw.open(url(server))
    await alice.link("alice")
    errors = []

    def from_a_thread():
        try:
            server.broadcast({"type": "app/from-thread"})
        except ServerError as error:
            errors.append(str(error))

    await asyncio.to_thread(from_a_thread)
    assert errors and "event loop's thread" in errors[0] and "call_soon_threadsafe" in errors[0]
    assert await alice.echo() == []  # nothing was sent, and the server still serves
    assert_projection(server)


async def test_an_unlink_for_what_the_client_sent_logs_what_it_was_without_auth(server):
    """'invalid message' or 'reserved type', and nothing to say what bob sent: the unlink's line now shows the
    start of the frame (never an auth string, even in a broken one); the event log keeps the reason only."""
    bob = await Raw.open(url(server))
    with capture_logs() as logs:
        for frame in ('{"type": "krmx/foo"}', '{not json', '{"type": "krmx/link", "payload": {"auth": "hunter2", ',
                      "{'type': 'krmx/link', 'payload': {'AUTH': 'hunter2'}}", '{"\\u0061uth": {"token": "hunter2"'):
            await bob.link("bob")
            await bob.send_raw(frame)
            assert await bob.next() == unlinked("bob")
    assert [(line["reason"], line["frame"]) for line in logs if line["event"] == "unlink"] == [
        ("reserved type", "krmx/foo"), ("invalid message", "{not json"),
        ("invalid message", '{"type": "krmx/link", "payload": {"[cut: may hold auth]'),
        ("invalid message", "{'type': 'krmx/link', 'payload': {'[cut: may hold auth]"),
        ("invalid message", '{"[cut: may hold auth]'),
    ]
    assert "hunter2" not in str(logs)
    with EventStore.open_readonly(server.config.db) as store:
        assert [e.data() for e in store.read(types=["unlink"])] == [
            {"reason": "reserved type"}] + [{"reason": "invalid message"}] * 4
