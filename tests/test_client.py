"""The Python client (:class:`lobby.Client`) against two servers: ours, and the official ``@krmx/server`` 0.5.5.

Every test runs twice, through the ``krmx`` fixture: once against a :class:`lobby.Server` in-process, once
against the official Node server started as a real process (``tests/js/reference_server.cjs``, the npm
packages installed by ``tests/jsdeps.py``). Both run the same small test app (echo, broadcast, send, kick,
join, unlink, deny, get-users; see the header of ``reference_server.cjs``). Clients that must lose their
connection go through :class:`tests.tcpproxy.Proxy`, a loopback TCP proxy the test can cut.

No sleeps as synchronisation: a test waits for an event of a client (bounded by ``WAIT``), and a linked
client's barrier is a ``test/echo`` round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from lobby import Client, ClientError, LinkRejected, RelinkPolicy, Server, ServerError

from .jsdeps import JS_DIR, JsEnv, JsSetupError
from .tcpproxy import Proxy

WAIT = 10.0
REFERENCE_SERVER = JS_DIR / "reference_server.cjs"

#: Fast, deterministic backoff for tests: waits of 10, 20, 40, 50, 50 ... ms.
FAST: dict[str, Any] = {"base_delay": 0.02, "max_delay": 0.1, "factor": 2.0, "random": lambda: 0.5}


def u(username: str, is_linked: bool) -> dict[str, Any]:
    return {"username": username, "isLinked": is_linked}


def sort_users(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(users, key=lambda user: user["username"])


# ---------------------------------------------------------------------------------------------------------
# The two servers, with the same app.


def build_test_app(server: Server) -> Server:
    """The Python twin of the app in tests/js/reference_server.cjs."""
    denied: set[str] = set()

    @server.on("authenticate")
    def authenticate(username: str, info: Any) -> None:
        if username.startswith("deny") or username in denied or info.auth in denied:
            raise PermissionError("denied by app")

    def fail(username: str, request: str, error: str) -> None:
        server.send(username, {"type": "test/error", "payload": {"request": request, "error": error}})

    def with_username(username: str, message: dict[str, Any], action: Callable[[str], Any]) -> None:
        payload = message.get("payload")
        if not isinstance(payload, dict) or not isinstance(payload.get("username"), str):
            fail(username, message["type"], "invalid request")
            return
        try:
            action(payload["username"])
        except ServerError as error:
            fail(username, message["type"], str(error))

    @server.on("message")
    def on_message(username: str, message: dict[str, Any]) -> None:
        type_, data = message["type"], message.get("payload")
        if type_ == "test/echo":
            server.send(username, {"type": "test/echoed", "payload": data} if "payload" in message
                        else {"type": "test/echoed"})
        elif type_ == "test/broadcast":
            server.broadcast({"type": "test/broadcasted", "payload": {"from": username, "data": data}})
        elif type_ == "test/send":
            if not isinstance(data, dict) or not isinstance(data.get("to"), str):
                fail(username, type_, "invalid request")
                return
            try:
                server.send(data["to"], {"type": "test/sent", "payload": {"from": username, "data": data.get("data")}})
            except ServerError as error:
                fail(username, type_, str(error))
        elif type_ == "test/kick":
            with_username(username, message, server.kick)
        elif type_ == "test/join":
            with_username(username, message, server.join)
        elif type_ == "test/unlink":
            with_username(username, message, server.unlink)
        elif type_ == "test/deny":
            with_username(username, message, denied.add)
        elif type_ == "test/get-users":
            server.send(username, {"type": "test/users", "payload": server.users})

    return server


class OurServer:
    name = "ours"

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "lobby.db"
        self.server: Server | None = None
        self.port = 0

    async def start(self) -> int:
        self.server = build_test_app(Server(host="127.0.0.1", port=0, db=str(self.db), ping_interval=None))
        self.port = await self.server.start()
        return self.port

    async def stop(self, *, keep_users: bool = False) -> None:
        if self.server is not None and self.server.status == "listening":
            await self.server.close(keep_users=keep_users)


class ReferenceServer:
    name = "reference"

    def __init__(self, env: JsEnv) -> None:
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0
        self.stderr = b""

    async def start(self) -> int:
        self.process = await asyncio.create_subprocess_exec(
            self.env.node, str(REFERENCE_SERVER), str(self.env.install_dir), "--port", "0",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = b""
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), 20)
            self.port = json.loads(line)["port"]
        except (TimeoutError, ValueError, KeyError):
            await self.stop()
            raise AssertionError(f"the reference server did not start: stdout {line!r}, stderr {self.stderr!r}")
        return self.port

    async def stop(self, *, keep_users: bool = False) -> None:
        """SIGTERM: the reference closes the Krmx way (every user leaves) and exits 0."""
        assert not keep_users, "the reference server has no keep-users close"
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        self.stderr = await process.stderr.read()


# ---------------------------------------------------------------------------------------------------------
# Recorded clients and the harness.


class Recorder:
    """A :class:`lobby.Client` whose every event is recorded with the client's state right after it."""

    def __init__(self, name: str, client: Client) -> None:
        self.name = name
        self.client = client
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._syncs = 0
        client.on("*", self._record)

    def _record(self, event: str, *args: Any) -> None:
        client = self.client
        self.events.append({"event": event, "args": list(args), "status": client.status,
                            "username": client.username, "users": client.users})
        self._changed.set()

    def __repr__(self) -> str:
        return f"<recorded client {self.name}>"

    def mark(self) -> int:
        return len(self.events)

    def events_since(self, mark: int = 0, *, without: tuple[str, ...] = ("message",)) -> list[list[Any]]:
        return [[e["event"], *e["args"]] for e in self.events[mark:] if e["event"] not in without]

    def messages_since(self, mark: int = 0) -> list[Any]:
        return [e["args"][0] for e in self.events[mark:] if e["event"] == "message"]

    async def wait_until(self, predicate: Callable[[], Any], what: str) -> Any:
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    self._changed.clear()
                    result = predicate()
                    if result:
                        return result
                    await self._changed.wait()
        except TimeoutError:
            last = [[e["event"], *e["args"]] for e in self.events[-12:]]
            raise AssertionError(f"{self.name}: timed out after {WAIT} s waiting for {what}; last events {last}") from None

    async def next_event(self, event: str, predicate: Callable[..., bool] = lambda *args: True,
                         *, after: int | None = None) -> dict[str, Any]:
        start = len(self.events) if after is None else after

        def find() -> dict[str, Any] | None:
            for record in self.events[start:]:
                if record["event"] == event and predicate(*record["args"]):
                    return record
            return None

        return await self.wait_until(find, f"a {event!r} event after #{start}")

    async def sync(self) -> None:
        """Barrier: everything the server sent this client before the echo has been handled."""
        self._syncs += 1
        token = f"sync-{self.name}-{self._syncs}"
        mark = self.mark()
        await self.client.send({"type": "test/echo", "payload": token})
        await self.next_event("message", lambda m: m == {"type": "test/echoed", "payload": token}, after=mark)

    async def link_fully(self, username: str, auth: str | None = None) -> None:
        await self.client.link(username, auth)
        await self.sync()

    async def request(self, message: dict[str, Any], reply_type: str) -> Any:
        mark = self.mark()
        await self.client.send(message)
        record = await self.next_event("message", lambda m: m["type"] == reply_type, after=mark)
        return record["args"][0].get("payload")

    async def server_users(self) -> list[dict[str, Any]]:
        return await self.request({"type": "test/get-users"}, "test/users")

    async def users_become(self, expected: list[dict[str, Any]]) -> None:
        want = sort_users(expected)
        await self.wait_until(lambda: sort_users(self.client.users) == want, f"users {want}")


class Krmx:
    """One server under test, a cuttable proxy in front of it, and the clients of a test."""

    def __init__(self, server: OurServer | ReferenceServer) -> None:
        self.server = server
        self.proxy: Proxy | None = None
        self.clients: list[Recorder] = []

    @property
    def kind(self) -> str:
        return self.server.name

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/"

    async def start(self) -> None:
        await self.server.start()
        self.proxy = Proxy(self.server.port)
        await self.proxy.start()

    async def client(self, name: str, *, via_proxy: bool = False, relink: RelinkPolicy | bool | None = None,
                     connect: bool = True) -> Recorder:
        recorder = Recorder(name, Client(relink=relink, ping_interval=None))
        self.clients.append(recorder)
        if connect:
            assert self.proxy is not None
            await recorder.client.connect(self.proxy.url if via_proxy else self.url)
            assert recorder.client.status == "connected"
        return recorder

    async def linked(self, username: str, **options: Any) -> Recorder:
        recorder = await self.client(username, **options)
        await recorder.link_fully(username)
        return recorder

    async def cleanup(self) -> None:
        for recorder in self.clients:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(recorder.client.__aexit__(None, None, None), 5)
        if self.proxy is not None:
            await self.proxy.close()
        await self.server.stop()


@pytest.fixture(params=["ours", "reference"])
async def krmx(request, tmp_path, js_env):
    """The server under test (started) with the client test app: ours in-process, or the official one."""
    if request.param == "ours":
        server: OurServer | ReferenceServer = OurServer(tmp_path)
    else:
        if isinstance(js_env, JsSetupError):
            pytest.fail(f"cannot run the official @krmx/server: {js_env}", pytrace=False)
        server = ReferenceServer(js_env)
    harness = Krmx(server)
    try:
        await harness.start()
        yield harness
    finally:
        await harness.cleanup()


@pytest.fixture
async def our_krmx(tmp_path):
    """Our server only, for what the reference cannot do (restart with its users)."""
    harness = Krmx(OurServer(tmp_path))
    try:
        await harness.start()
        yield harness
    finally:
        await harness.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Linking and the user list.


async def test_links_and_receives_the_full_registry(krmx):
    """A client that links learns every user through the link burst, in the server's join order: a linked
    user, a server-joined unlinked user, itself; ``link()`` returns on its own link, and its user list then
    equals the server's."""
    alice = await krmx.linked("alice")
    await alice.client.send({"type": "test/join", "payload": {"username": "rik"}})
    await alice.next_event("join", lambda name: name == "rik", after=0)
    simon = await krmx.client("simon")
    assert simon.client.users == [] and simon.client.username is None

    await simon.client.link("simon")
    assert simon.client.status == "linked" and simon.client.username == "simon"
    assert simon.events_since(0) == [
        ["connecting"], ["connect"], ["linking"], ["accept"],
        ["join", "alice"], ["link", "alice"], ["join", "rik"], ["join", "simon"], ["link", "simon"],
    ]
    assert simon.client.users == [u("simon", True), u("alice", True), u("rik", False)]
    assert await simon.server_users() == [u("alice", True), u("rik", False), u("simon", True)]
    await alice.users_become([u("alice", True), u("rik", False), u("simon", True)])
    assert alice.events_since(0)[-3:] == [["join", "rik"], ["join", "simon"], ["link", "simon"]]


async def test_sees_others_join_link_unlink_and_leave(krmx):
    """A linked client follows another through join, link, unlink, link again and leave, with exactly those
    events; the other's own unlink empties its list, and its own leave comes after its own unlink, while it
    is connected with no users, never while linked."""
    simon = await krmx.linked("simon")
    mark = simon.mark()
    lisa = await krmx.client("lisa")
    assert simon.client.users == [u("simon", True)], "a connection that is not linked is invisible"

    await lisa.link_fully("lisa")
    await simon.users_become([u("simon", True), u("lisa", True)])
    await lisa.client.unlink()
    assert lisa.client.status == "connected" and lisa.client.users == [] and lisa.client.username is None
    await simon.users_become([u("simon", True), u("lisa", False)])

    await lisa.link_fully("lisa")
    assert sort_users(lisa.client.users) == [u("lisa", True), u("simon", True)]
    lisa_mark = lisa.mark()
    await lisa.client.leave()
    await simon.users_become([u("simon", True)])
    await lisa.next_event("leave", lambda name: name == "lisa", after=lisa_mark)
    assert lisa.events_since(lisa_mark) == [["unlinking"], ["unlink", "lisa"], ["leave", "lisa"]]
    own = [e for e in lisa.events[lisa_mark:] if e["event"] in ("unlink", "leave")]
    assert [(e["status"], e["users"]) for e in own] == [("connected", []), ("connected", [])]
    assert simon.events_since(mark) == [
        ["join", "lisa"], ["link", "lisa"], ["unlink", "lisa"], ["link", "lisa"], ["unlink", "lisa"], ["leave", "lisa"],
    ]
    assert await simon.server_users() == [u("simon", True)]


async def test_rejected_with_the_servers_reason(krmx):
    """``link()`` raises :class:`LinkRejected` carrying the server's own words (the protocol's and the
    app's); the client is ``connected`` again with no username and no users, and can then link."""
    simon = await krmx.linked("simon")
    client = await krmx.client("mallory")
    for username, reason in (("a", "invalid username"), ("denyme", "denied by app"),
                             ("simon", "user simon is already linked to a connection")):
        with pytest.raises(LinkRejected) as rejected:
            await client.client.link(username)
        assert rejected.value.reason == reason
        assert str(rejected.value) == f"link rejected: {reason}"
        assert client.client.status == "connected"
        assert client.client.username is None and client.client.users == []
    assert client.events_since(0) == [
        ["connecting"], ["connect"], ["linking"], ["reject", "invalid username"],
        ["linking"], ["reject", "denied by app"], ["linking"], ["reject", "user simon is already linked to a connection"],
    ]
    await client.link_fully("mallory")
    assert await simon.server_users() == [u("simon", True), u("mallory", True)]


async def test_kicked_by_the_server_ends_connected_without_users(krmx):
    """A server kick: the kicked client sees its own unlink (already ``connected`` with an empty list) then
    its own leave; the other client sees unlink and leave; the kicked client can link again (a new user).
    A kick is not a drop: a client with automatic relink does not relink."""
    alice = await krmx.linked("alice")
    bob = await krmx.linked("bob", relink=RelinkPolicy(**FAST))
    await alice.users_become([u("alice", True), u("bob", True)])
    alice_mark, bob_mark = alice.mark(), bob.mark()

    await alice.client.send({"type": "test/kick", "payload": {"username": "bob"}})
    own_leave = await bob.next_event("leave", lambda name: name == "bob", after=bob_mark)
    assert bob.events_since(bob_mark) == [["unlink", "bob"], ["leave", "bob"]]
    assert (bob.events[bob_mark]["status"], bob.events[bob_mark]["users"]) == ("connected", [])
    assert own_leave["users"] == [] and bob.client.username is None
    await alice.users_become([u("alice", True)])
    assert alice.events_since(alice_mark) == [["unlink", "bob"], ["leave", "bob"]]

    await bob.link_fully("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    assert not bob.client.relinking


async def test_unlinked_by_the_server_stays_connected(krmx):
    """A server-side unlink: the client sees its own unlink, stays connected (the user stays, unlinked),
    and may link again; the others follow."""
    alice = await krmx.linked("alice")
    bob = await krmx.linked("bob")
    bob_mark = bob.mark()
    await alice.client.send({"type": "test/unlink", "payload": {"username": "bob"}})
    await bob.next_event("unlink", lambda name: name == "bob", after=bob_mark)
    assert bob.client.status == "connected" and bob.client.users == []
    await alice.users_become([u("alice", True), u("bob", False)])
    await bob.link_fully("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    assert sort_users(bob.client.users) == [u("alice", True), u("bob", True)]


# ---------------------------------------------------------------------------------------------------------
# Messages.


async def test_receives_sent_and_broadcast_messages(krmx):
    """Messages from the server arrive as ``message`` events in the order sent: two direct sends, then a
    broadcast, which reaches the sender too."""
    alice = await krmx.linked("alice")
    bob = await krmx.linked("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    bob_mark, alice_mark = bob.mark(), alice.mark()
    for message in ({"type": "test/send", "payload": {"to": "bob", "data": 1}},
                    {"type": "test/send", "payload": {"to": "bob", "data": {"text": "héllo"}}},
                    {"type": "test/broadcast", "payload": 3}):
        await alice.client.send(message)
    await alice.next_event("message", lambda m: m["type"] == "test/broadcasted", after=alice_mark)
    await bob.sync()
    assert [m for m in bob.messages_since(bob_mark) if m["type"] != "test/echoed"] == [
        {"type": "test/sent", "payload": {"from": "alice", "data": 1}},
        {"type": "test/sent", "payload": {"from": "alice", "data": {"text": "héllo"}}},
        {"type": "test/broadcasted", "payload": {"from": "alice", "data": 3}},
    ]
    error = await alice.request({"type": "test/send", "payload": {"to": "nobody", "data": 1}}, "test/error")
    assert "does not exist" in error["error"]


async def test_async_iteration_yields_every_event_until_the_close(krmx):
    """``async for event in client.events()`` sees the events from its creation on, messages included, and
    ends by itself once the connection closed for good."""
    recorder = await krmx.client("simon", connect=False)
    client = recorder.client
    stream = client.events()
    seen: list[tuple[str, tuple[Any, ...]]] = []

    async def consume() -> None:
        async for event in stream:
            seen.append((event.name, event.args))
            if event.name == "message" and event.args[0]["type"] == "test/echoed":
                await client.disconnect(force=True)

    consumer = asyncio.create_task(consume())
    await client.connect(krmx.url)
    await client.link("simon")
    await client.send({"type": "test/echo", "payload": "hi"})
    await asyncio.wait_for(consumer, WAIT)
    assert seen == [
        ("connecting", ()), ("connect", ()), ("linking", ()), ("accept", ()), ("join", ("simon",)),
        ("link", ("simon",)), ("message", ({"type": "test/echoed", "payload": "hi"},)), ("closing", ()),
        ("close", ()),
    ]
    assert [name for name, _ in seen] == [e["event"] for e in recorder.events]


async def test_wrong_status_calls_raise_clear_errors(krmx):
    """As in the official client, a call in the wrong status raises a ``ClientError`` that names the call
    and the status; ``send`` refuses the reserved ``krmx/`` prefix; a failed connect says where."""
    recorder = await krmx.client("simon", connect=False)
    client = recorder.client
    with pytest.raises(ClientError, match="^cannot link when the client is initializing$"):
        await client.link("simon")
    with pytest.raises(ClientError, match="^cannot disconnect when the client is initializing$"):
        await client.disconnect(force=True)
    await client.connect(krmx.url)
    with pytest.raises(ClientError, match="^cannot connect when the client is connected$"):
        await client.connect(krmx.url)
    with pytest.raises(ClientError, match="^cannot send when the client is connected$"):
        await client.send({"type": "test/echo"})
    with pytest.raises(ClientError, match="^cannot leave when the client is connected$"):
        await client.leave()
    await recorder.link_fully("simon")
    with pytest.raises(ClientError, match="internal 'krmx/' prefix"):
        await client.send({"type": "krmx/leave"})
    with pytest.raises(ClientError, match="^cannot link when the client is linked$"):
        await client.link("lisa")
    with pytest.raises(ClientError, match="^cannot disconnect when the client is linked$"):
        await client.disconnect()
    await client.unlink()
    await client.disconnect()
    assert client.status == "closed" and client.users == []
    assert recorder.events_since(0)[-4:] == [["unlinking"], ["unlink", "simon"], ["closing"], ["close"]]

    other = await krmx.client("other", connect=False)
    nobody = await _free_port()
    with pytest.raises(ClientError, match="^error while trying to connect to the server at ws://127.0.0.1:"):
        await other.client.connect(f"ws://127.0.0.1:{nobody}/")
    assert other.events_since(0) == [["connecting"], ["close"]] and other.client.status == "closed"


async def _free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


async def test_server_close_is_seen_and_not_relinked(krmx):
    """When the server closes, linked clients see every user unlink and leave, then the close; a client
    with automatic relink does not relink (its user left), and its event stream ends."""
    alice = await krmx.linked("alice", relink=RelinkPolicy(**FAST))
    bob = await krmx.linked("bob", relink=RelinkPolicy(**FAST))
    await alice.users_become([u("alice", True), u("bob", True)])
    alice_mark, bob_mark = alice.mark(), bob.mark()
    stream = bob.client.events()
    await krmx.server.stop()
    for recorder in (alice, bob):
        await recorder.wait_until(lambda r=recorder: r.client.status == "closed", "the close")
        assert not recorder.client.relinking
    assert alice.events_since(alice_mark) == [["unlink", "alice"], ["leave", "alice"], ["close"]]
    assert bob.events_since(bob_mark) == [["unlink", "alice"], ["leave", "alice"], ["unlink", "bob"], ["leave", "bob"], ["close"]]
    names = [event.name async for event in stream]
    assert names == ["unlink", "leave", "unlink", "leave", "close"]


async def test_wait_for_fails_when_the_client_closes_for_good_and_refuses_when_closed(our_krmx):
    """A wait for an event that will never come raises instead of hanging (as streams end)."""
    simon = await our_krmx.linked("simon")
    waiter = asyncio.ensure_future(simon.client.wait_for("message"))
    await asyncio.sleep(0)
    await our_krmx.server.stop()
    with pytest.raises(ClientError, match="closed for good"):
        await asyncio.wait_for(waiter, WAIT)
    with pytest.raises(ClientError, match="client is closed"):
        await simon.client.wait_for("message", timeout=WAIT)
    connecting = asyncio.ensure_future(simon.client.wait_for("connecting", timeout=WAIT))
    await asyncio.sleep(0)
    assert not connecting.done()  # a later connect() brings it
    connecting.cancel()


async def test_wait_for_an_unknown_event_is_refused(our_krmx):
    simon = await our_krmx.linked("simon")
    with pytest.raises(ValueError, match="unknown client event 'messages'"):
        await simon.client.wait_for("messages", timeout=WAIT)


# ---------------------------------------------------------------------------------------------------------
# Automatic relink.


async def test_relinks_after_a_dropped_connection(krmx):
    """The connection is cut (no close frame): a client with automatic relink reconnects and links to the
    same user again, saying so (``relinking(1, delay)``, then ``relinked``); the server sees an unlink and a
    link, the other client follows, and the client goes on sending and receiving."""
    observer = await krmx.linked("observer")
    simon = await krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(**FAST))
    await observer.users_become([u("observer", True), u("simon", True)])
    mark, observer_mark = simon.mark(), observer.mark()

    assert krmx.proxy.cut() == 1
    await simon.next_event("relinked", after=mark)
    await simon.sync()
    events = simon.events_since(mark)
    assert events[:2] == [["close"], ["relinking", 1, 0.01]]
    assert events[-1][0] == "relinked" and events[-1][1] == "simon"
    # The server may still hold the old connection when the first attempt links ("already linked"): such
    # an attempt is retried; every attempt in between is a plain reconnect.
    assert [e for e in events if e[0] == "reject"] == [
        ["reject", "user simon is already linked to a connection"]] * (events[-1][2] - 1)
    assert events[-6:] == [["linking"], ["accept"], ["join", "observer"], ["link", "observer"],
                           ["join", "simon"], ["link", "simon"], ["relinked", "simon", events[-1][2]]][-6:]
    assert simon.client.status == "linked" and sort_users(simon.client.users) == [u("observer", True), u("simon", True)]
    await observer.users_become([u("observer", True), u("simon", True)])
    assert observer.events_since(observer_mark) == [["unlink", "simon"], ["link", "simon"]]
    assert await simon.server_users() == [u("observer", True), u("simon", True)]


async def test_relink_backs_off_while_the_server_is_unreachable(krmx):
    """While the server cannot be reached, attempts fail and the waits grow exponentially within their bound
    (full jitter, here fixed at half the bound); once it can be reached again, the relink succeeds."""
    policy = RelinkPolicy(max_attempts=10, **FAST)
    simon = await krmx.linked("simon", via_proxy=True, relink=policy)
    mark = simon.mark()
    krmx.proxy.refusing = True
    krmx.proxy.cut()
    await simon.next_event("relinking", lambda attempt, delay: attempt == 4, after=mark)
    krmx.proxy.refusing = False
    done = await simon.next_event("relinked", after=mark)
    attempts = [e["args"] for e in simon.events[mark:] if e["event"] == "relinking"]
    assert [delay for _, delay in attempts] == [policy.delay(n) for n in range(1, len(attempts) + 1)]
    assert [delay for _, delay in attempts][:4] == [0.01, 0.02, 0.04, 0.05]
    assert done["args"][1] == len(attempts) >= 4
    assert krmx.proxy.refused >= 3
    assert simon.client.status == "linked"
    await simon.sync()


async def test_relink_gives_up_after_its_limit(krmx):
    """When the server stays unreachable, the client gives up after ``max_attempts``: ``relink_failed`` says
    so and why, the client is closed and its event stream ends."""
    simon = await krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(max_attempts=3, **FAST))
    mark = simon.mark()
    stream = simon.client.events()
    krmx.proxy.refusing = True
    krmx.proxy.cut()
    failed = await simon.next_event("relink_failed", after=mark)
    reason = failed["args"][0]
    assert reason.startswith("gave up after 3 attempts: error while trying to connect to the server at ws://127.0.0.1:")
    assert [e["args"][0] for e in simon.events[mark:] if e["event"] == "relinking"] == [1, 2, 3]
    assert simon.client.status == "closed" and not simon.client.relinking
    names = [event.name async for event in stream]
    assert names[0] == "close" and names[-1] == "relink_failed"


async def test_relink_stops_when_the_server_rejects_it(krmx):
    """A relink the server rejects for a reason of its own ends at once with that reason; the client stays
    connected, unlinked, and the user stays in the lobby unlinked."""
    observer = await krmx.linked("observer")
    simon = await krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(**FAST))
    await observer.client.send({"type": "test/deny", "payload": {"username": "simon"}})
    await observer.sync()
    mark = simon.mark()
    krmx.proxy.cut()
    failed = await simon.next_event("relink_failed", after=mark)
    assert failed["args"] == ["link rejected: denied by app"]
    assert simon.events_since(mark) == [
        ["close"], ["relinking", 1, 0.01], ["connecting"], ["connect"], ["linking"], ["reject", "denied by app"],
        ["relink_failed", "link rejected: denied by app"],
    ]
    assert simon.client.status == "connected" and not simon.client.relinking
    await observer.users_become([u("observer", True), u("simon", False)])


async def test_relink_takes_a_fresh_auth_for_each_attempt(krmx):
    """A relink policy's ``auth`` gives each attempt its auth (an expired token is not sent again); one that
    raises counts as a failed attempt, and the next attempt calls it again."""
    calls: list[str] = []

    async def fresh_token(username: str) -> str:
        calls.append(username)
        if len(calls) == 1:
            raise TimeoutError("auth service timed out")  # its own, not the attempt's limit
        return f"token-{len(calls)}"

    observer = await krmx.linked("observer")
    simon = await krmx.client("simon", via_proxy=True, relink=RelinkPolicy(**FAST, auth=fresh_token))
    await simon.link_fully("simon", "token-1")
    await observer.client.send({"type": "test/deny", "payload": {"username": "token-1"}})  # it expired
    await observer.sync()
    mark = simon.mark()
    krmx.proxy.cut()
    done = await simon.next_event("relinked", after=mark)
    assert done["args"] == ["simon", 2]
    assert calls == ["simon", "simon"]
    assert simon.events_since(mark)[:3] == [["close"], ["relinking", 1, 0.01], ["relinking", 2, 0.02]]
    assert ["reject", "denied by app"] not in simon.events_since(mark)
    assert simon.client.status == "linked"


@pytest.mark.parametrize(("own_timeout", "said"), [
    (False, "the relink policy's auth function gave no answer within 0.2 s"),
    (True, "the relink policy's auth function failed: TimeoutError('token service timed out')"),
])
async def test_a_relink_auth_function_that_never_answers_is_a_failed_attempt(our_krmx, own_timeout, said):
    """An auth service that takes the request and never answers: the relink waited for ever, its attempts
    never counted. Each call has the attempt's ``link_timeout`` (a TimeoutError of the function's own is its
    failure, said as such)."""
    calls = []

    async def hanging(username: str) -> str:
        calls.append(username)
        if own_timeout:
            raise TimeoutError("token service timed out")
        await asyncio.Event().wait()
        return "never"

    simon = await our_krmx.linked("simon", via_proxy=True,
                                  relink=RelinkPolicy(**FAST, max_attempts=2, link_timeout=0.2, auth=hanging))
    mark = simon.mark()
    our_krmx.proxy.cut()
    failed = await simon.next_event("relink_failed", after=mark)
    assert failed["args"] == [f"gave up after 2 attempts: {said}"]
    assert calls == ["simon", "simon"]


async def test_relink_gives_up_when_its_auth_function_returns_no_string(our_krmx):
    """An auth function that returns something other than a string or None is a bug: the relink ends at once
    and says so, instead of retrying it."""
    simon = await our_krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(**FAST, auth=lambda username: 42))
    mark = simon.mark()
    our_krmx.proxy.cut()
    failed = await simon.next_event("relink_failed", after=mark)
    assert failed["args"] == ["the relink policy's auth function must return a string or None, not 42"]
    assert simon.events_since(mark) == [["close"], ["relinking", 1, 0.01], ["relink_failed", *failed["args"]]]
    assert simon.client.status == "closed" and not simon.client.relinking
    with pytest.raises(ValueError, match="auth must be a function of the username"):
        RelinkPolicy(auth="token")  # type: ignore[arg-type]


async def test_disconnect_stops_a_relink_in_progress(krmx):
    """``disconnect()`` during an automatic relink cancels it (``relink_failed`` says so) and leaves the
    client closed; a client that disconnects itself is never relinked."""
    simon = await krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(max_attempts=50, **FAST))
    mark = simon.mark()
    krmx.proxy.refusing = True
    krmx.proxy.cut()
    await simon.next_event("relinking", lambda attempt, delay: attempt == 2, after=mark)
    with pytest.raises(ClientError, match="relink is in progress"):  # the relink would tear that link down
        await simon.client.link("other")
    await simon.client.disconnect()
    assert simon.client.status == "closed" and not simon.client.relinking
    assert simon.events[-1]["event"] in ("relink_failed", "close")
    assert [e["args"] for e in simon.events[mark:] if e["event"] == "relink_failed"] == [
        ["cancelled: disconnect() was called"]]

    krmx.proxy.refusing = False
    lisa = await krmx.linked("lisa", via_proxy=True, relink=RelinkPolicy(**FAST))
    lisa_mark = lisa.mark()
    await lisa.client.disconnect(force=True)
    assert lisa.events_since(lisa_mark) == [["closing"], ["close"]] and not lisa.client.relinking


async def test_relinks_across_a_restart_of_our_server(our_krmx):
    """Ours only (the reference has no restart with state): a deploy closes our server keeping its users
    (each is unlinked with reason ``server restart``); the clients relink by themselves once a new server
    is up on the same log, and the log tells the story."""
    krmx = our_krmx
    simon = await krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(max_attempts=20, **FAST))
    lisa = await krmx.linked("lisa", via_proxy=True, relink=RelinkPolicy(max_attempts=20, **FAST))
    await simon.users_become([u("simon", True), u("lisa", True)])
    mark = simon.mark()
    await krmx.server.stop(keep_users=True)
    await simon.next_event("relinking", after=mark)
    await krmx.server.start()  # a new Server on the same log, on a new port
    krmx.proxy.target = ("127.0.0.1", krmx.server.port)
    await simon.next_event("relinked", after=mark)
    await lisa.next_event("relinked", after=mark)
    await simon.users_become([u("simon", True), u("lisa", True)])
    assert await simon.server_users() == [u("simon", True), u("lisa", True)]

    from events import EventStore

    with EventStore.open_readonly(krmx.server.db) as store:
        story = [(e.type, getattr(e, "username", None), getattr(e, "reason", None)) for e in store.read()
                 if e.type in ("listen", "close", "join", "link", "unlink")
                 and getattr(e, "username", "simon") == "simon"]
    assert story[:5] == [("listen", None, None), ("join", "simon", None), ("link", "simon", None),
                         ("unlink", "simon", "server restart"), ("close", None, "server restart")]
    assert story[5] == ("listen", None, None) and story[-1] == ("link", "simon", None)


# ---------------------------------------------------------------------------------------------------------
# Misuse that must neither hang nor break the connection.


async def test_a_failing_wait_for_predicate_raises_in_its_waiter_and_the_connection_stays(our_krmx):
    simon = await our_krmx.linked("simon")
    waiter = asyncio.ensure_future(simon.client.wait_for("message", lambda m: m["missing"], timeout=WAIT))
    await asyncio.sleep(0)
    await simon.client.send({"type": "test/echo", "payload": "x"})
    with pytest.raises(KeyError, match="missing"):
        await waiter
    await simon.sync()
    assert simon.client.status == "linked"


async def test_a_wait_for_predicate_raising_stop_iteration_raises_in_its_waiter_and_the_connection_stays(our_krmx):
    """A future refuses StopIteration (a ``next()`` on an empty iterator, in a predicate): it killed the
    reader, which dropped the connection."""
    simon = await our_krmx.linked("simon")
    waiter = asyncio.ensure_future(
        simon.client.wait_for("message", lambda m: next(iter(m["payload"])) == 1, timeout=WAIT)
    )
    await asyncio.sleep(0)
    await simon.client.send({"type": "test/echo", "payload": []})
    with pytest.raises(RuntimeError, match="predicate raised StopIteration"):
        await waiter
    await simon.sync()
    assert simon.client.status == "linked"


async def test_a_relink_whose_connection_drops_with_its_link_tries_again():
    """The relink's link burst and the drop of its connection arrive together: the drop came before the
    relink resumed, so no new relink started, and the relink then said ``relinked`` of a closed client, which
    stayed closed for good with its streams open. The client ends linked on the third connection."""
    from websockets.asyncio.server import serve

    burst = [json.dumps(frame) for frame in ({"type": "krmx/accepted"},
                                             {"type": "krmx/joined", "payload": {"username": "simon"}},
                                             {"type": "krmx/linked", "payload": {"username": "simon"}})]
    connections = 0

    async def handler(ws: Any) -> None:
        nonlocal connections
        connections += 1
        await ws.recv()  # krmx/link
        for frame in burst:
            await ws.send(frame)
        if connections <= 2:  # the first drop starts the relink; the second comes with its link burst
            if connections == 1:
                await asyncio.sleep(0.2)
            ws.transport.abort()
        else:
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None) as fake:
        client = Client(relink=RelinkPolicy(**FAST), ping_interval=None)
        seen: list[str] = []
        client.on("*", lambda name, *args: seen.append(name))
        await client.connect(f"ws://127.0.0.1:{fake.sockets[0].getsockname()[1]}")
        await client.link("simon")
        try:
            await client.wait_for("relinked", lambda *_: connections == 3, timeout=WAIT)
            assert client.status == "linked" and not client.relinking
            assert seen.count("close") == 2 and seen[-1] == "relinked" and "relink_failed" not in seen
        finally:
            await client.disconnect(force=True)


async def test_a_welcome_sent_on_link_is_caught_by_a_wait_for_started_before_the_link(tmp_path):
    """The README's way to catch what a server sends with the link: the frames read with the link's answer
    are handled before link() returns (so the user list is whole then), so a wait_for started after it would
    miss them; one started before, as a task, catches them."""
    server = Server(host="127.0.0.1", port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    server.on("link", lambda username: server.send(username, {"type": "game/welcome"}))
    port = await server.start()
    for name in ("bob", "simon", "zed"):  # simon comes back: its own link is told before zed's join
        server.join(name)
    client = Client(ping_interval=None)
    try:
        await client.connect(f"ws://127.0.0.1:{port}")
        welcome = asyncio.ensure_future(client.wait_for("message", timeout=WAIT))
        await client.link("simon")
        assert sort_users(client.users) == [u("bob", False), u("simon", True), u("zed", False)]  # the whole burst
        assert await welcome == ({"type": "game/welcome"},)
    finally:
        await client.disconnect(force=True)
        await server.close()


async def test_a_link_that_no_answer_comes_to_ends_with_a_clear_error():
    """A websocket server that does not speak Krmx (an echo server: the wrong port) never answers a link, and
    pings kept it open: link() waited for ever. A relink to it gives up with the same words."""
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for frame in ws:
            await ws.send(frame)

    async with serve(echo, "127.0.0.1", 0, compression=None) as fake:
        url = f"ws://127.0.0.1:{fake.sockets[0].getsockname()[1]}"
        client = Client()
        await client.connect(url)
        try:
            with pytest.raises(ClientError, match=rf"no answer to the link within 0.2 s \(is {url} a Krmx server\?\)"):
                await client.link("simon", timeout=0.2)
            assert client.status == "linking"
            with pytest.raises(ValueError, match="timeout must be a positive number"):
                await client.link("simon", timeout=0)
        finally:
            await client.disconnect(force=True)
        assert client.status == "closed"


async def _silent_after_link(ws: Any) -> None:
    """A server that accepts a link, then neither answers nor reads again (it hangs, or its host froze)."""
    link = orjson.loads(await ws.recv())
    who = link["payload"]["username"]
    await ws.send(orjson.dumps({"type": "krmx/accepted"}).decode())
    for kind in ("joined", "linked"):
        await ws.send(orjson.dumps({"type": f"krmx/{kind}", "payload": {"username": who}}).decode())
    await ws.wait_closed()  # reads nothing more: what comes in queues, up to max_queue, then stays unread


async def test_unlink_and_leave_that_no_answer_comes_to_end_with_a_clear_error():
    from websockets.asyncio.server import serve

    async with serve(_silent_after_link, "127.0.0.1", 0, compression=None) as fake:
        for call in ("unlink", "leave"):
            client = Client(ping_interval=None)
            await client.connect(f"ws://127.0.0.1:{fake.sockets[0].getsockname()[1]}")
            try:
                await client.link("simon")
                with pytest.raises(ClientError, match=rf"no answer to the {call} within 0.2 s"):
                    await getattr(client, call)(timeout=0.2)
                with pytest.raises(ValueError, match="timeout must be a positive number"):
                    await getattr(client, call)(timeout=-1)
            finally:
                await client.disconnect(force=True)


@pytest.mark.parametrize("app", ["sends on", "gives up on a send", "gives up on a send, then disconnects"])
async def test_sending_to_a_server_that_stopped_reading_ends_as_a_dropped_connection(app):
    """Once the socket's buffer is full, send() waited for ever: websockets' keepalive pings wait behind the
    unread frames. Twice the ping interval without progress drops the connection, with a clear error. Also
    when the app bounds its sends (asyncio.wait_for(client.send(m), 3)) and gave up on one: the watch ended with
    that send, so the client said linked for ever, and disconnect(force=True) waited for ever to write its close
    frame behind the unread ones."""
    from websockets.asyncio.server import serve

    async with serve(
        _silent_after_link, "127.0.0.1", 0, compression=None, max_size=None, max_queue=1, close_timeout=0.5
    ) as fake:
        client = Client(ping_interval=0.3)
        await client.connect(f"ws://127.0.0.1:{fake.sockets[0].getsockname()[1]}")
        await client.link("simon")
        closed = asyncio.ensure_future(client.wait_for("close"))
        big = {"type": "app/upload", "payload": "x" * 1_000_000}
        if app == "sends on":
            with pytest.raises(ClientError, match=r"the connection dropped: the server read nothing for 0.6 s"):
                for _ in range(200):
                    await asyncio.wait_for(client.send(big), 20)
        else:
            with pytest.raises(TimeoutError):
                for _ in range(200):
                    await asyncio.wait_for(client.send(big), 0.2)
            if app.endswith("disconnects"):
                await asyncio.wait_for(client.disconnect(force=True), 5)
        await asyncio.wait_for(closed, 5)
        assert client.status == "closed"


async def test_a_network_that_went_silent_is_a_dropped_connection_within_the_ping_and_close_timeouts(tmp_path):
    """No reset, no FIN: the pings go unanswered. The drop came 10 s later than the pings told (websockets'
    close timeout for a handshake that could not happen), and a disconnect() then took as long."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    await server.start()
    proxy = Proxy(server.port)
    await proxy.start()
    try:
        client = Client(ping_interval=0.3)
        await client.connect(proxy.url)
        await client.link("simon")
        proxy.silent = True
        # 2 x 0.3 s of pings, then CLOSE_TIMEOUT (2 s) for the closing handshake: well before 10 s.
        await client.wait_for("close", timeout=5)
        proxy.silent = False
        quitter = Client(ping_interval=None)
        await quitter.connect(proxy.url)
        await quitter.link("ann")
        proxy.silent = True
        await asyncio.wait_for(quitter.disconnect(force=True), 5)
        assert quitter.status == "closed"
    finally:
        await proxy.close()
        await server.close()


async def test_send_takes_any_mapping(tmp_path):
    import types

    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    got: list[dict] = []
    server.on("message", lambda username, message: got.append(message))
    await server.start()
    client = Client(ping_interval=None)
    try:
        await client.connect(f"ws://127.0.0.1:{server.port}/")
        await client.link("simon")
        await client.send(types.MappingProxyType({"type": "app/x", "payload": 1}))
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == [{"type": "app/x", "payload": 1}]
    finally:
        await client.disconnect(force=True)
        await server.close()


ENDING_APP = """
import asyncio, sys
from lobby import Client

async def main():
    client = Client(ping_interval=None)

    @client.on("close")
    async def save():
        print("saving", flush=True)
        await asyncio.sleep(0.1)
        print("saved", flush=True)

    await client.connect(sys.argv[1])
    await client.link("simon")

asyncio.run(main())  # returns linked: the loop's shutdown cancels the client's reader
"""


async def test_an_app_that_ends_connected_lets_its_async_close_listeners_end(tmp_path):
    """The reader, cancelled as the app's loop ends, emits close: its async listener became a task the loop
    did not know of, destroyed pending ('Task was destroyed but it is pending!'), never finished."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    await server.start()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-X", "dev", "-c", ENDING_APP, f"ws://127.0.0.1:{server.port}/",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
    finally:
        await server.close()
    assert (process.returncode, out, err) == (0, b"saving\nsaved\n", b"")


async def test_a_send_over_a_slow_link_that_drains_is_waited_for(tmp_path):
    """The server reads all along, slowly (a proxy that passes 256 KiB/s): a 1 MiB message takes longer
    than twice the ping interval to go, and is sent, not taken for a server that stopped reading."""
    server = Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None)
    got: list[int] = []
    server.on("message", lambda username, message: got.append(len(message["payload"])))
    await server.start()
    rate = 256 * 1024

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096 if slow else 65536):
                writer.write(data)
                await writer.drain()
                if slow:
                    await asyncio.sleep(len(data) / rate)
        writer.close()

    async def proxied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # small kernel buffers: the proxy sets the pace
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    proxy = await asyncio.start_server(proxied, sock=listening)
    client = Client(ping_interval=1.5)
    try:
        await client.connect(f"ws://127.0.0.1:{listening.getsockname()[1]}")
        client._ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        await client.link("simon")
        started = time.monotonic()
        await asyncio.wait_for(client.send({"type": "app/upload", "payload": "x" * 1024 * 1024}), 30)
        assert time.monotonic() - started > 3.0  # longer than the limit: measured by progress, not in total
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert got == [1024 * 1024] and client.status == "linked"
    finally:
        if client.status != "closed":
            await client.disconnect(force=True)
        proxy.close()
        await server.close()


async def test_a_relink_that_no_answer_comes_to_gives_up_saying_so():
    from websockets.asyncio.server import serve

    connections = 0

    async def handler(ws: Any) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:  # a Krmx server, for the first link, then gone
            await ws.recv()
            for frame in ({"type": "krmx/accepted"}, {"type": "krmx/joined", "payload": {"username": "simon"}},
                          {"type": "krmx/linked", "payload": {"username": "simon"}}):
                await ws.send(json.dumps(frame))
            await asyncio.sleep(0.1)
            ws.transport.abort()
            return
        async for frame in ws:  # then something else on its port
            await ws.send(frame)

    async with serve(handler, "127.0.0.1", 0, compression=None) as fake:
        url = f"ws://127.0.0.1:{fake.sockets[0].getsockname()[1]}"
        client = Client(relink=RelinkPolicy(**FAST, max_attempts=2, link_timeout=0.2))
        await client.connect(url)
        await client.link("simon")
        try:
            (reason,) = await client.wait_for("relink_failed", timeout=WAIT)
            assert reason == f"gave up after 2 attempts: no answer to the link within 0.2 s (is {url} a Krmx server?)"
        finally:
            if client.status != "closed":
                await client.disconnect(force=True)


async def test_a_listener_of_one_event_and_of_every_event_gets_each_signature(our_krmx):
    simon = await our_krmx.linked("simon")
    calls: list[tuple[Any, ...]] = []

    def both(*args: Any) -> None:
        calls.append(args)

    simon.client.on("*", both)
    simon.client.on("message", both)
    await simon.sync()
    message = {"type": "test/echoed", "payload": "sync-simon-2"}
    assert calls == [("message", message), (message,)]


async def test_streams_end_when_closed_by_aclose_or_already_closed(our_krmx):
    recorder = await our_krmx.client("simon")
    stream = recorder.client.events()

    async def consume() -> list[Any]:
        return [event async for event in stream]

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    await stream.aclose()
    assert await asyncio.wait_for(consumer, WAIT) == []
    await recorder.client.disconnect(force=True)
    late = recorder.client.events()
    assert await asyncio.wait_for(consume_all(late), WAIT) == []


async def consume_all(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def test_connect_with_a_bad_url_or_bad_options_is_a_client_error_and_leaves_it_closed(our_krmx):
    client = Client(ping_interval=None)
    with pytest.raises(ClientError, match="url is a string"):
        await client.connect(123)  # type: ignore[arg-type]
    assert client.status == "initializing"
    odd = Client(ping_interval=None, connect_options={"bogus": 1})
    with pytest.raises(ClientError, match="error while trying to connect"):
        await odd.connect(our_krmx.url)
    assert odd.status == "closed"
    await client.connect(our_krmx.url)
    assert client.status == "connected"
    await client.disconnect()


# ---------------------------------------------------------------------------------------------------------
# Races and endings.


async def _open_connections(krmx: Krmx, count: int) -> None:
    """Wait until our server holds ``count`` open connections."""
    server = krmx.server.server
    for _ in range(250):
        if server.metrics.health()["connections"] == count:
            return
        await asyncio.sleep(0.02)
    assert server.metrics.health()["connections"] == count


async def test_a_forced_disconnect_just_as_the_connection_opens_closes_it_and_ends_closed(our_krmx):
    """disconnect(force=True) landing after the socket opened but before connect() resumed: connect() raises,
    the socket is closed, and the client ends closed with its close event (disconnect() waited for it)."""
    client = Client(ping_interval=None)
    events: list[str] = []
    client.on("*", lambda name, *args: events.append(name))
    real_open = client._open

    async def open_then_disconnect(url: str) -> Any:
        ws = await real_open(url)
        client.core.disconnect(True)  # what disconnect() does first, as it would run between the two
        return ws

    client._open = open_then_disconnect  # type: ignore[method-assign]
    with pytest.raises(ClientError, match="cancelled by disconnect"):
        await client.connect(our_krmx.url)
    assert client.status == "closed" and events == ["connecting", "closing", "close"]
    await _open_connections(our_krmx, 0)


async def test_a_connect_cancelled_just_as_the_connection_opens_closes_it(our_krmx):
    """A timeout around connect() that fires as the socket opens must not leave the socket open: the server
    would keep it until its link deadline (the reference, for ever)."""
    client = Client(ping_interval=None)
    opened = asyncio.Event()
    real_open = client._open

    async def open_and_say(url: str) -> Any:
        ws = await real_open(url)
        opened.set()
        return ws

    client._open = open_and_say  # type: ignore[method-assign]
    connecting = asyncio.create_task(client.connect(our_krmx.url))
    await opened.wait()
    connecting.cancel()  # the open is done; connect() has not resumed yet
    with pytest.raises(asyncio.CancelledError):
        await connecting
    assert client.status == "closed"
    await _open_connections(our_krmx, 0)


async def test_an_application_that_ends_while_linked_is_not_relinked(our_krmx):
    """The loop cancelling the client's reader (the application returned or raised) is no dropped
    connection: no relink starts, the client closes."""
    simon = await our_krmx.linked("simon", relink=RelinkPolicy(**FAST))
    mark = simon.mark()
    reader = simon.client._reader
    assert reader is not None
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert simon.events_since(mark) == [["close"]]
    assert simon.client.status == "closed" and not simon.client.relinking


async def test_close_listeners_know_whether_a_relink_follows(our_krmx):
    simon = await our_krmx.linked("simon", via_proxy=True, relink=RelinkPolicy(**FAST))
    seen: list[bool] = []
    simon.client.on("close", lambda: seen.append(simon.client.relinking))
    mark = simon.mark()
    our_krmx.proxy.cut()
    await simon.next_event("relinked", after=mark)
    await simon.client.disconnect(force=True)
    assert seen == [True, False]


def test_the_default_relink_outlasts_a_servers_ping_timeout():
    """A half-open connection is unlinked by the server only after its ping interval and timeout (15 s + 15 s
    by default); until then every relink is rejected as 'already linked'. The default policy waits longer
    than that on average (full jitter: half of each cap)."""
    policy = RelinkPolicy()
    assert sum(policy.cap(n) for n in range(1, policy.max_attempts + 1)) / 2 > 30
    # Not only on average: a phone that switched networks is rejected as "already linked" for up to 32 s
    # (2 x 15 s of ping, 2 s to close); 12 attempts gave up in about 1 of 5 such drops.
    rng = random.Random(1)
    totals = [sum(rng.random() * policy.cap(n) for n in range(1, policy.max_attempts + 1)) for _ in range(10_000)]
    assert sum(total < 35 for total in totals) <= 5


async def test_a_cut_off_is_logged_by_the_client_with_the_servers_reason(tmp_path, caplog):
    server = build_test_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, message_burst=3,
                                   message_rate=1))
    await server.start()
    try:
        client = Client(ping_interval=None)
        await client.connect(f"ws://127.0.0.1:{server.port}/")
        await client.link("simon")
        with caplog.at_level("WARNING", logger="lobby.client"):
            for n in range(10):
                with contextlib.suppress(ClientError):
                    await client.send({"type": "test/echo", "payload": n})
            await asyncio.wait_for(client.wait_for("close"), WAIT)
        assert "the server closed the connection: rate limit (code 1001)" in caplog.text
    finally:
        await server.close()


@pytest.mark.parametrize("limit", ["rate limit", "frame too large"])
async def test_a_cut_off_for_what_the_client_sent_ends_its_relink(tmp_path, caplog, limit):
    """A client cut off for its own frames (a bug flooding the server) would send them again after a relink:
    cut off, relinked, cut off, ... each cycle an unlink and a link in the log. It stays closed instead."""
    options = {"message_burst": 3, "message_rate": 1} if limit == "rate limit" else {"max_frame_size": 1024}
    server = build_test_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None, **options))
    await server.start()
    try:
        client = Client(ping_interval=None, relink=RelinkPolicy(base_delay=0.01, max_delay=0.01))
        events: list[str] = []
        client.on("*", lambda name, *args: events.append(name))
        await client.connect(f"ws://127.0.0.1:{server.port}/")
        await client.link("simon")
        closed = asyncio.ensure_future(client.wait_for("close"))
        with caplog.at_level("WARNING", logger="lobby.client"):
            for n in range(10 if limit == "rate limit" else 1):
                with contextlib.suppress(ClientError):
                    await client.send({"type": "test/echo", "payload": n if limit == "rate limit" else "x" * 2000})
            await asyncio.wait_for(closed, WAIT)
            await asyncio.sleep(0.2)  # a relink would have begun by now
        assert client.status == "closed" and not client.relinking
        assert "relinking" not in events and events[-1] == "close"
        assert "; not relinking" in caplog.text
    finally:
        await server.close()


async def test_a_normal_server_close_is_not_a_warning(tmp_path, caplog):
    server = build_test_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    await server.start()
    client = Client(ping_interval=None)
    await client.connect(f"ws://127.0.0.1:{server.port}/")
    await client.link("simon")
    with caplog.at_level("WARNING", logger="lobby.client"):
        await server.close()
        for _ in range(250):
            if client.status == "closed":
                break
            await asyncio.sleep(0.02)
    assert client.status == "closed" and caplog.text == ""
