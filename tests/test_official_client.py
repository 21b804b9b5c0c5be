"""Our server, driven by the official JavaScript client ``@krmx/client`` (0.5.4, from npm).

Each test starts a :class:`lobby.Server` in-process and talks to it through one or more real official
clients: ``tests/js/driver.mjs`` runs one ``createClient()`` in a Node process, takes JSON commands on stdin
and prints every client event (with the client's state right after it) and every command result as JSON
lines on stdout. :class:`OfficialClient` is the Python end of that pipe; it only ever waits for something to
arrive, with a bound (no sleeps as synchronisation).

The npm packages pinned in ``tests/js/package.json`` (and ``package-lock.json``) are installed once into a
cache folder of the tests' own, outside the repository (see ``tests/jsdeps.py``). Node.js (>= 18) and npm must
be on ``PATH``: without them these tests fail, saying so.

After every test, the live registry must equal the registry rebuilt from the event log (read through a
read-only open, while the server runs and after it closed), and the auth string the clients sent must
appear nowhere in the bytes of the log files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from events import EventStore, rebuild
from lobby import Server

from .jsdeps import JS_DIR, JsEnv, JsSetupError

DRIVER = JS_DIR / "driver.mjs"
#: Longest wait for one expected thing (a client event, a command result). Generous for slow machines.
WAIT = 10.0
#: The auth string every official client sends when linking; it must never reach the log.
SECRET = "secret-token-123"


@pytest.fixture(scope="session")
def official_client_env(js_env) -> JsEnv | JsSetupError:
    """The installed official client, or why it is not available (tests then fail with that message)."""
    return js_env


# ---------------------------------------------------------------------------------------------------------
# The Python end of one official client.


class ClientCommandError(Exception):
    """A driver command failed in JavaScript (a rejected promise or a thrown error); ``str()`` is its message."""


class OfficialClient:
    """One official ``@krmx/client`` in its own Node process (tests/js/driver.mjs)."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        #: Every client event: {"event", "args", "status", "username", "users"} (state right after it).
        self.events: list[dict[str, Any]] = []
        self.fatal: list[str] = []
        self.stderr = ""
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._changed = asyncio.Event()
        self._eof = False
        self._sync_count = 0
        self._reader = asyncio.create_task(self._read_stdout())
        self._err_reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def spawn(cls, env: JsEnv, name: str) -> OfficialClient:
        process = await asyncio.create_subprocess_exec(
            env.node, str(DRIVER), str(env.install_dir),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(name, process)

    def __repr__(self) -> str:
        return f"<official client {self.name}>"

    # -- the pipe ---------------------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        try:
            while line := await self.process.stdout.readline():
                try:
                    record = json.loads(line)
                except ValueError:
                    self.fatal.append(f"driver printed a line that is not JSON: {line!r}")
                    continue
                kind = record.get("kind")
                if kind == "event":
                    self.events.append(record)
                elif kind == "result":
                    future = self._pending.pop(record["id"], None)
                    if future is not None and not future.done():
                        future.set_result(record)
                else:
                    self.fatal.append(record.get("error", repr(record)))
                self._changed.set()
        finally:
            self._eof = True
            self._changed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(AssertionError(f"{self.name}: the Node driver exited{self._diagnostics()}"))
            self._pending.clear()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(4096):
            self.stderr = (self.stderr + chunk.decode(errors="replace"))[-8000:]

    def _diagnostics(self) -> str:
        parts = []
        if self.fatal:
            parts.append(f"driver errors: {self.fatal}")
        if self.stderr.strip():
            parts.append(f"driver stderr: {self.stderr.strip()}")
        last = [[e["event"], *e["args"]] for e in self.events[-10:]]
        parts.append(f"last events: {last}")
        return "; " + "; ".join(parts)

    async def call(self, cmd: str, **args: Any) -> Any:
        """Run one driver command; return its value or raise :class:`ClientCommandError`."""
        if self._eof:
            raise AssertionError(f"{self.name}: the Node driver is gone{self._diagnostics()}")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": request_id, "cmd": cmd, **args}).encode() + b"\n")
        await self.process.stdin.drain()
        try:
            result = await asyncio.wait_for(future, WAIT)
        except TimeoutError:
            self._pending.pop(request_id, None)
            raise AssertionError(f"{self.name}: no result of {cmd} {args} within {WAIT} s{self._diagnostics()}") from None
        if not result["ok"]:
            raise ClientCommandError(result["error"])
        return result["value"]

    async def wait_until(self, predicate: Callable[[], Any], what: str) -> Any:
        """Return ``predicate()`` once it is truthy, checked now and after every line from the driver."""
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    self._changed.clear()
                    result = predicate()
                    if result:
                        return result
                    if self._eof:
                        raise AssertionError(f"{self.name}: the Node driver exited while waiting for {what}"
                                             f"{self._diagnostics()}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{self.name}: timed out after {WAIT} s waiting for {what}"
                                 f"{self._diagnostics()}") from None

    async def next_event(self, event: str, predicate: Callable[..., bool] = lambda *args: True,
                         *, after: int | None = None) -> dict[str, Any]:
        """The first ``event`` with ``predicate(*args)`` among the events from index ``after`` (default: now)."""
        start = len(self.events) if after is None else after

        def find() -> dict[str, Any] | None:
            for record in self.events[start:]:
                if record["event"] == event and predicate(*record["args"]):
                    return record
            return None

        return await self.wait_until(find, f"a {event!r} event")

    async def users_become(self, expected: list[dict[str, Any]]) -> None:
        """Wait until the client's user list (the state after its last event), in any order, is ``expected``."""
        want = sort_users(expected)
        await self.wait_until(lambda: self.events and sort_users(self.events[-1]["users"]) == want,
                              f"users {want}")
        assert sort_users(await self.users()) == want

    def mark(self) -> int:
        return len(self.events)

    def events_since(self, mark: int, *, without: tuple[str, ...] = ("message",)) -> list[list[Any]]:
        """``[[event, *args], ...]`` from index ``mark`` on, leaving out the events named in ``without``."""
        return [[e["event"], *e["args"]] for e in self.events[mark:] if e["event"] not in without]

    def messages_since(self, mark: int = 0) -> list[Any]:
        return [e["args"][0] for e in self.events[mark:] if e["event"] == "message"]

    # -- the client API ---------------------------------------------------------------------------------

    async def connect(self, url: str) -> None:
        await self.call("connect", url=url)

    async def link(self, username: str, auth: str | None = SECRET) -> None:
        """``client.link(username, auth)``: resolves on the first 'link' event the client sees."""
        await self.call("link", username=username, auth=auth)

    async def sync(self) -> None:
        """Barrier: a test/echo message, answered by the test server; returns when the echo came back, so
        everything the server sent to this client before is processed by then."""
        self._sync_count += 1
        token = f"sync-{self.name}-{self._sync_count}"
        mark = self.mark()
        await self.send({"type": "test/echo", "payload": token})
        await self.next_event("message", lambda m: m == {"type": "test/echoed", "payload": token}, after=mark)

    async def link_fully(self, username: str, auth: str | None = SECRET) -> None:
        """link() and wait until the whole link burst is processed (link() resolves on the first 'link')."""
        await self.link(username, auth)
        await self.sync()

    async def unlink(self) -> None:
        await self.call("unlink")

    async def leave(self) -> None:
        await self.call("leave")

    async def disconnect(self, force: bool = False) -> None:
        await self.call("disconnect", force=force)

    async def drop(self) -> None:
        """Terminate the socket without a close handshake (the connection drops)."""
        await self.call("drop")

    async def send(self, message: dict[str, Any]) -> None:
        await self.call("send", message=message)

    async def users(self) -> list[dict[str, Any]]:
        return await self.call("users")

    async def status(self) -> str:
        return await self.call("status")

    async def username(self) -> str | None:
        return await self.call("username")

    async def stop(self) -> None:
        """End the driver: close its stdin (it terminates its socket and exits); kill it if it hangs."""
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                assert self.process.stdin is not None
                self.process.stdin.close()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in (self._reader, self._err_reader):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)


def sort_users(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(users, key=lambda user: user["username"])


def u(username: str, is_linked: bool) -> dict[str, Any]:
    return {"username": username, "isLinked": is_linked}


# ---------------------------------------------------------------------------------------------------------
# Our server, in-process.


class Lobby:
    """A :class:`lobby.Server` on a free port with its log in ``tmp_path``; echoes every client message back
    to its sender as ``test/echoed`` and records what the listeners saw."""

    def __init__(self, tmp_path: Path, env: JsEnv | JsSetupError) -> None:
        self.tmp_path = tmp_path
        self.db = tmp_path / "lobby.db"
        self.env = env
        self.server = Server(host="127.0.0.1", port=0, db=str(self.db), ping_interval=None)
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.clients: list[OfficialClient] = []
        self.url = ""
        self.server.on("message", self._on_message)

    def _on_message(self, username: str, message: dict[str, Any]) -> None:
        self.received.append((username, message))
        self.server.send(username, {"type": "test/echoed", "payload": message.get("payload")})

    async def start(self) -> None:
        if isinstance(self.env, JsSetupError):
            pytest.fail(f"cannot run the official @krmx/client: {self.env}", pytrace=False)
        port = await self.server.start()
        self.url = f"ws://127.0.0.1:{port}/"

    async def client(self, name: str) -> OfficialClient:
        """A new official client (own Node process), connected to the server."""
        assert isinstance(self.env, JsEnv)
        client = await OfficialClient.spawn(self.env, name)
        self.clients.append(client)
        await client.connect(self.url)
        assert await client.status() == "connected"
        return client

    async def linked_client(self, username: str) -> OfficialClient:
        client = await self.client(username)
        await client.link_fully(username)
        return client

    # -- the log ----------------------------------------------------------------------------------------

    def log(self) -> list[Any]:
        with EventStore.open_readonly(self.db) as store:
            return list(store.read())

    def lifecycle_of(self, username: str) -> list[tuple[str, str | None]]:
        """``[(type, reason), ...]`` of ``username``'s join/link/unlink/leave events, in log order."""
        return [(e.type, getattr(e, "reason", None)) for e in self.log()
                if getattr(e, "username", None) == username and e.type in ("join", "link", "unlink", "leave")]

    def assert_log_is_the_truth(self, when: str) -> None:
        """The live registry is the registry rebuilt from the log; the clients' auth string is not logged."""
        live = self.server.core.registry
        with EventStore.open_readonly(self.db) as store:
            rebuilt = rebuild(store.read())
            loaded = store.load_registry("main")
            links = [e for e in store.read(types=["link"])]
        assert rebuilt == live, f"{when}: registry rebuilt from the log {rebuilt!r} != live registry {live!r}"
        assert loaded == live, f"{when}: load_registry('main') {loaded!r} != live registry {live!r}"
        assert rebuilt.as_list() == self.server.users or self.server.status == "closed"
        # The clients did send the secret (so its absence below means something) ...
        assert any(e.auth for e in links), f"{when}: no link with auth in the log: {links}"
        # ... and no byte of it reached the log, its WAL or its shared-memory file.
        files = sorted(self.tmp_path.glob("lobby.db*"))
        assert files, f"{when}: no log file in {self.tmp_path}"
        for path in files:
            leaked = SECRET.encode() in path.read_bytes()
            assert not leaked, f"{when}: the auth string {SECRET!r} is in {path.name}"

    async def finish(self) -> None:
        """End of a test: check the log against the live registry, close the server, check again."""
        for client in self.clients:
            assert not client.fatal, f"{client.name}: driver errors {client.fatal}"
        self.assert_log_is_the_truth("while serving")
        await self.server.close()
        assert self.server.status == "closed"
        assert self.server.core.registry.users == {}, "a Krmx close makes every user leave"
        self.assert_log_is_the_truth("after close")
        assert self.log()[-1].type == "close"

    async def cleanup(self) -> None:
        for client in self.clients:
            await client.stop()
        if self.server.status == "listening":
            await self.server.close()


@pytest.fixture
async def lobby(tmp_path, official_client_env):
    """Our server (not started yet: tests register listeners first, then ``await lobby.start()``)."""
    lobby = Lobby(tmp_path, official_client_env)
    try:
        yield lobby
    finally:
        await lobby.cleanup()


# ---------------------------------------------------------------------------------------------------------
# The tests.


async def test_links_and_receives_the_full_registry(lobby):
    """An official client that links learns every user (a server-joined unlinked one, another linked
    official client, itself) through the link burst; its user list equals ``server.users``."""
    await lobby.start()
    lobby.server.join("rik")
    lisa = await lobby.linked_client("lisa")
    simon = await lobby.client("simon")
    assert await simon.users() == []

    await simon.link_fully("simon")

    assert lobby.server.users == [u("rik", False), u("lisa", True), u("simon", True)]
    assert sort_users(await simon.users()) == sort_users(lobby.server.users)
    assert await simon.status() == "linked"
    assert await simon.username() == "simon"
    assert simon.events_since(0) == [
        ["connecting"], ["connect"], ["linking"], ["accept"],
        ["join", "rik"], ["join", "lisa"], ["link", "lisa"], ["join", "simon"], ["link", "simon"],
    ]
    await lisa.users_become(lobby.server.users)
    assert lisa.events_since(0)[-2:] == [["join", "simon"], ["link", "simon"]]
    assert lobby.lifecycle_of("simon") == [("join", None), ("link", None)]
    await lobby.finish()


async def test_sees_another_client_join_link_unlink_and_leave(lobby):
    """A linked official client follows another official client through join, link, unlink, link again
    and leave, with exactly those events and a user list that always equals ``server.users``."""
    await lobby.start()
    simon = await lobby.linked_client("simon")
    mark = simon.mark()
    lisa = await lobby.client("lisa")

    await lisa.link_fully("lisa")
    await simon.users_become([u("simon", True), u("lisa", True)])
    assert sort_users(await simon.users()) == sort_users(lobby.server.users)

    await lisa.unlink()
    await simon.users_become([u("simon", True), u("lisa", False)])
    assert lobby.server.users == [u("simon", True), u("lisa", False)]
    assert await lisa.status() == "connected" and await lisa.users() == []

    await lisa.link_fully("lisa")
    await simon.users_become([u("simon", True), u("lisa", True)])
    assert sort_users(await lisa.users()) == sort_users(lobby.server.users)

    lisa_mark = lisa.mark()
    await lisa.leave()
    await simon.users_become([u("simon", True)])
    assert lobby.server.users == [u("simon", True)]
    assert simon.events_since(mark) == [
        ["join", "lisa"], ["link", "lisa"], ["unlink", "lisa"], ["link", "lisa"], ["unlink", "lisa"], ["leave", "lisa"],
    ]
    # The leaving client sees its own unlink first; the server also sends its own left, which comes after.
    await lisa.next_event("leave", lambda name: name == "lisa", after=lisa_mark)
    assert lisa.events_since(lisa_mark) == [["unlinking"], ["unlink", "lisa"], ["leave", "lisa"]]
    assert await lisa.status() == "connected" and await lisa.users() == []
    assert lobby.lifecycle_of("lisa") == [
        ("join", None), ("link", None), ("unlink", "requested"), ("link", None), ("unlink", "requested"),
        ("leave", "requested"),
    ]
    await lobby.finish()


async def test_receives_sent_messages_and_broadcasts_with_skip(lobby):
    """A client message reaches the server's message listener; ``server.send`` reaches only its user;
    ``server.broadcast`` reaches every linked client, except the one named in ``skip``."""
    await lobby.start()
    alice = await lobby.linked_client("alice")
    bob = await lobby.linked_client("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    alice_mark, bob_mark = alice.mark(), bob.mark()

    await bob.send({"type": "test/hello", "payload": {"n": 1, "text": "héllo"}})
    await bob.next_event("message", lambda m: m["type"] == "test/echoed", after=bob_mark)
    assert lobby.received[-1] == ("bob", {"type": "test/hello", "payload": {"n": 1, "text": "héllo"}})

    lobby.server.send("bob", {"type": "test/direct", "payload": "for bob"})
    lobby.server.broadcast({"type": "test/news", "payload": 1})
    lobby.server.broadcast({"type": "test/news", "payload": 2}, skip="alice")
    await bob.next_event("message", lambda m: m == {"type": "test/news", "payload": 2}, after=bob_mark)
    await alice.sync()  # anything sent to alice before its echo has arrived by now
    await bob.sync()

    assert [m for m in bob.messages_since(bob_mark) if m["type"] != "test/echoed"] == [
        {"type": "test/direct", "payload": "for bob"},
        {"type": "test/news", "payload": 1},
        {"type": "test/news", "payload": 2},
    ]
    assert [m for m in alice.messages_since(alice_mark) if m["type"] != "test/echoed"] == [
        {"type": "test/news", "payload": 1},
    ]
    outgoing = [(e.type, getattr(e, "username", None), getattr(e, "skip", None), e.message)
                for e in lobby.log() if e.type in ("send", "broadcast") and e.message["type"] != "test/echoed"]
    assert outgoing == [
        ("send", "bob", None, {"type": "test/direct", "payload": "for bob"}),
        ("broadcast", None, None, {"type": "test/news", "payload": 1}),
        ("broadcast", None, "alice", {"type": "test/news", "payload": 2}),
    ]
    await lobby.finish()


async def test_rejected_with_the_servers_own_reason(lobby):
    """An authenticate listener raising ``PermissionError("no entry")`` rejects the link: the official
    client's ``link()`` promise rejects with exactly that reason, the client stays connected without users,
    nothing about the user is logged; the same client can then link as an allowed user."""
    seen: list[tuple[str, bool, str | None]] = []

    @lobby.server.on("authenticate")
    def authenticate(username, info):
        seen.append((username, info.is_new_user, info.auth))
        if username == "mallory" or info.auth != SECRET:
            raise PermissionError("no entry")

    await lobby.start()
    client = await lobby.client("mallory")
    with pytest.raises(ClientCommandError) as rejected:
        await client.link("mallory")
    assert str(rejected.value) == "no entry"
    assert client.events_since(0) == [["connecting"], ["connect"], ["linking"], ["reject", "no entry"]]
    assert await client.status() == "connected"
    assert await client.users() == [] and await client.username() is None

    with pytest.raises(ClientCommandError, match="^no entry$"):
        await client.link("simon", auth="wrong")
    await client.link_fully("simon")

    assert seen == [("mallory", True, SECRET), ("simon", True, "wrong"), ("simon", True, SECRET)]
    assert lobby.server.users == [u("simon", True)]
    assert sort_users(await client.users()) == lobby.server.users
    assert [e for e in lobby.log() if getattr(e, "username", None) == "mallory"] == []
    assert lobby.lifecycle_of("simon") == [("join", None), ("link", None)]
    await lobby.finish()


async def test_kicked_by_the_server(lobby):
    """``server.kick`` of a linked official client: it sees its own unlink, then its own leave, and ends
    connected with an empty user list; the other client sees unlink and leave too."""
    await lobby.start()
    alice = await lobby.linked_client("alice")
    bob = await lobby.linked_client("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    alice_mark, bob_mark = alice.mark(), bob.mark()

    lobby.server.kick("bob")

    own_leave = await bob.next_event("leave", lambda name: name == "bob", after=bob_mark)
    assert bob.events_since(bob_mark) == [["unlink", "bob"], ["leave", "bob"]]
    own_unlink = bob.events[bob_mark]
    assert own_unlink["status"] == "connected" and own_unlink["users"] == []
    assert own_leave["users"] == []
    assert await bob.status() == "connected"
    assert await bob.users() == [] and await bob.username() is None

    await alice.users_become([u("alice", True)])
    assert alice.events_since(alice_mark) == [["unlink", "bob"], ["leave", "bob"]]
    assert lobby.server.users == [u("alice", True)]
    assert lobby.lifecycle_of("bob") == [("join", None), ("link", None), ("unlink", "kick"), ("leave", "kick")]

    await bob.link_fully("bob")  # a kicked client can come back (as a new user)
    await alice.users_become([u("alice", True), u("bob", True)])
    assert sort_users(await bob.users()) == sort_users(lobby.server.users)
    await lobby.finish()


async def test_relinks_after_its_connection_dropped(lobby):
    """A user whose connection ended is unlinked with reason ``dropped`` and can link again: first the same
    client object after ``disconnect()`` and a new ``connect()``, then a new client after the socket was cut
    without a close handshake. The other client follows; the log shows link, unlink (dropped), link."""
    await lobby.start()
    observer = await lobby.linked_client("observer")
    simon = await lobby.linked_client("simon")
    await observer.users_become([u("observer", True), u("simon", True)])
    mark = observer.mark()

    await simon.disconnect(force=True)
    assert await simon.status() == "closed" and await simon.users() == []
    await observer.users_become([u("observer", True), u("simon", False)])
    assert lobby.server.users == [u("observer", True), u("simon", False)]

    await simon.connect(lobby.url)
    await simon.link_fully("simon")
    assert sort_users(await simon.users()) == [u("observer", True), u("simon", True)]
    await observer.users_become([u("observer", True), u("simon", True)])

    await simon.drop()
    await observer.users_become([u("observer", True), u("simon", False)])
    again = await lobby.linked_client("simon")
    assert sort_users(await again.users()) == [u("observer", True), u("simon", True)]
    await observer.users_become([u("observer", True), u("simon", True)])

    assert observer.events_since(mark) == [["unlink", "simon"], ["link", "simon"], ["unlink", "simon"], ["link", "simon"]]
    assert lobby.server.users == [u("observer", True), u("simon", True)]
    assert lobby.lifecycle_of("simon") == [
        ("join", None), ("link", None), ("unlink", "dropped"), ("link", None), ("unlink", "dropped"), ("link", None),
    ]
    await lobby.finish()


async def test_unlinked_by_the_server_and_sees_the_close(lobby):
    """``server.unlink`` makes an official client see its own unlink (it stays connected, may link again);
    ``server.close()`` makes the linked clients see unlink and leave of every user, then close."""
    await lobby.start()
    alice = await lobby.linked_client("alice")
    bob = await lobby.linked_client("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    bob_mark = bob.mark()

    lobby.server.unlink("bob")
    await bob.next_event("unlink", lambda name: name == "bob", after=bob_mark)
    await alice.users_become([u("alice", True), u("bob", False)])
    assert await bob.status() == "connected" and await bob.users() == []
    await bob.link_fully("bob")
    await alice.users_become([u("alice", True), u("bob", True)])
    assert lobby.lifecycle_of("bob") == [("join", None), ("link", None), ("unlink", "server"), ("link", None)]

    alice_mark, bob_mark = alice.mark(), bob.mark()
    await lobby.finish()  # checks the log, closes the server, checks again
    for client in (alice, bob):
        await client.wait_until(lambda c=client: c.events and c.events[-1]["event"] == "close", "the close event")
    assert alice.events_since(alice_mark) == [["unlink", "alice"], ["leave", "alice"], ["close"]]
    assert bob.events_since(bob_mark) == [["unlink", "alice"], ["leave", "alice"], ["unlink", "bob"], ["leave", "bob"], ["close"]]
    assert await bob.status() == "closed" and await bob.users() == []
