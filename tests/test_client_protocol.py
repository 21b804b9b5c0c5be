"""The client core (:mod:`lobby.client_protocol`) without a socket or a clock: frames in, events out.

Two kinds of tests: frames scripted by hand (the exact sequences the official ``@krmx/client`` 0.5.4 handles,
with the state its listeners see), and a pair harness that wires one :class:`lobby.ServerProtocol` to N
:class:`lobby.ClientProtocol` in memory, so both cores of this repository are checked against each other.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import orjson
import pytest

from lobby import ClientError, ClientEvent, ClientProtocol, RelinkPolicy, ServerProtocol
from lobby.client_protocol import ALLOWED, CLIENT_STATUSES, is_transient_rejection
from lobby.protocol import CloseNext, Drain, FinishLeave, Resume, SendFrame


def frame(type_: str, payload: Any = None) -> bytes:
    return orjson.dumps({"type": type_} if payload is None else {"type": type_, "payload": payload})


def about(type_: str, username: str) -> bytes:
    return frame(type_, {"username": username})


def u(username: str, is_linked: bool) -> dict[str, Any]:
    return {"username": username, "isLinked": is_linked}


class Recorded:
    """A client core whose every event is recorded with the state right after it (as a listener sees it)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, tuple[Any, ...], str, str | None, list[dict[str, Any]]]] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self.core = ClientProtocol(self._record, warn=self.warnings.append, note=self.notes.append)

    def _record(self, event: ClientEvent) -> None:
        core = self.core
        self.records.append((event.name, event.args, core.status, core.username, core.users))

    def names(self) -> list[str]:
        return [r[0] for r in self.records]

    def events(self, start: int = 0) -> list[list[Any]]:
        return [[name, *args] for name, args, *_ in self.records[start:]]

    def first(self, name: str) -> list[Any]:
        for event, args, status, username, users in self.records:
            if event == name:
                return [status, username, users, *args]
        raise AssertionError(f"no {name!r} event in {self.names()}")

    def linked_as(self, username: str, *burst: bytes) -> None:
        self.core.connect()
        self.core.connected()
        self.core.link(username)
        self.core.receive(frame("krmx/accepted"))
        for data in burst:
            self.core.receive(data)


# -- the official client's sequences, scripted ---------------------------------------------------------------


def test_every_event_carries_the_official_clients_state():
    """The sequence of the conformance suite's 'every client event is emitted with the expected state'
    scenario, frame by frame: each event with the status, username and user list the official client's
    listeners see at that moment."""
    client = Recorded()
    core = client.core
    core.connect()
    core.connected()
    assert orjson.loads(core.link("inv#lid")) == {
        "type": "krmx/link", "payload": {"username": "inv#lid", "version": "0.5.5"},
    }
    core.receive(frame("krmx/rejected", {"reason": "invalid username"}))
    core.link("simon")
    for data in (frame("krmx/accepted"), about("krmx/joined", "simon"), about("krmx/linked", "simon"),
                 about("krmx/joined", "lisa"), frame("conf/sent", {"from": "simon", "data": "Hello, world!"}),
                 about("krmx/left", "lisa")):
        core.receive(data)
    assert core.unlink() == b'{"type":"krmx/unlink"}'
    core.receive(about("krmx/unlinked", "simon"))
    core.disconnect()
    core.closed()

    assert client.first("connecting") == ["connecting", None, []]
    assert client.first("connect") == ["connected", None, []]
    assert client.first("linking") == ["linking", "inv#lid", []]
    assert client.first("reject") == ["connected", None, [], "invalid username"]
    assert client.first("accept") == ["linked", "simon", [u("simon", True)]]
    assert client.first("join") == ["linked", "simon", [u("simon", True)], "simon"]
    assert client.first("link") == ["linked", "simon", [u("simon", True)], "simon"]
    assert client.first("message") == ["linked", "simon", [u("simon", True), u("lisa", False)],
                                       {"type": "conf/sent", "payload": {"from": "simon", "data": "Hello, world!"}}]
    assert client.first("leave") == ["linked", "simon", [u("simon", True)], "lisa"]
    assert client.first("unlinking") == ["unlinking", "simon", [u("simon", True)]]
    assert client.first("unlink") == ["connected", "simon", [], "simon"]
    assert client.first("closing") == ["closing", None, []]
    assert client.first("close") == ["closed", None, []]
    assert client.names() == [
        "connecting", "connect", "linking", "reject", "linking", "accept", "join", "link", "join", "message",
        "leave", "unlinking", "unlink", "closing", "close",
    ]
    assert core.username is None and client.warnings == []


def test_own_unlink_clears_the_user_list_and_the_username_after_the_event():
    """On its own ``krmx/unlinked`` the client is ``connected`` with an empty user list *before* the
    ``unlink`` event (whose listeners still read the username), and has no username after it; another
    user's unlink only marks that user unlinked."""
    client = Recorded()
    client.linked_as("simon", about("krmx/joined", "lisa"), about("krmx/linked", "lisa"),
                     about("krmx/joined", "simon"), about("krmx/linked", "simon"))
    core = client.core
    assert core.users == [u("simon", True), u("lisa", True)]
    core.receive(about("krmx/unlinked", "lisa"))
    assert core.users == [u("simon", True), u("lisa", False)] and core.status == "linked"
    core.receive(about("krmx/unlinked", "simon"))
    assert client.records[-1][:5] == ("unlink", ("simon",), "connected", "simon", [])
    assert core.username is None and core.users == [] and core.status == "connected"


def test_leave_is_reported_for_itself_only_after_its_own_unlink():
    """``leave()`` sends ``krmx/leave``; the server answers with the client's own unlinked then left: the
    client reports ``unlink`` (its list cleared), then ``leave`` for itself while ``connected`` with no users,
    never while linked. Other users' leaves while linked just remove them."""
    client = Recorded()
    client.linked_as("bob", about("krmx/joined", "alice"), about("krmx/linked", "alice"),
                     about("krmx/joined", "bob"), about("krmx/linked", "bob"))
    core = client.core
    mark = len(client.records)
    assert core.leave() == b'{"type":"krmx/leave"}'
    assert core.status == "unlinking"
    core.receive(about("krmx/unlinked", "bob"))
    core.receive(about("krmx/left", "bob"))
    assert client.events(mark) == [["unlinking"], ["unlink", "bob"], ["leave", "bob"]]
    own_leave = client.records[-1]
    assert own_leave[2] == "connected" and own_leave[3] is None and own_leave[4] == []
    assert all(not (name == "leave" and args == ("bob",) and status == "linked")
               for name, args, status, *_ in client.records)


def test_kicked_client_sees_unlink_then_leave_and_ends_connected():
    """A server kick arrives as the client's own unlinked, then its own left: the same two events as a
    requested leave, without the ``unlinking`` first; the client can link again."""
    client = Recorded()
    client.linked_as("bob", about("krmx/joined", "bob"), about("krmx/linked", "bob"))
    mark = len(client.records)
    client.core.receive(about("krmx/unlinked", "bob"))
    client.core.receive(about("krmx/left", "bob"))
    assert client.events(mark) == [["unlink", "bob"], ["leave", "bob"]]
    assert client.core.status == "connected" and client.core.users == []
    client.core.link("bob")
    assert client.core.status == "linking"


def test_joined_marks_only_itself_linked_and_linked_marks_others():
    """``krmx/joined`` lists a user unlinked, except the client's own user; ``krmx/linked`` marks it linked.
    The list keeps the order the client learned of the users (the server's join order for the burst)."""
    client = Recorded()
    client.linked_as("simon", about("krmx/joined", "rik"), about("krmx/joined", "lisa"),
                     about("krmx/linked", "lisa"), about("krmx/joined", "simon"), about("krmx/linked", "simon"))
    assert client.core.users == [u("simon", True), u("rik", False), u("lisa", True)]
    assert client.events(3) == [["accept"], ["join", "rik"], ["join", "lisa"], ["link", "lisa"],
                                ["join", "simon"], ["link", "simon"]]


def test_custom_messages_only_while_linked():
    """A custom message is emitted only while ``linked``; in any other status it is dropped (as the official
    client does while linking or unlinking): with a warning, or a note where the client's own unlink explains it
    (a game's last answer crossing its leave is a usual race, not a problem)."""
    client = Recorded()
    core = client.core
    core.connect()
    core.connected()
    core.receive(frame("app/early", 1))
    core.link("simon")
    core.receive(frame("app/early", 2))
    core.receive(frame("krmx/accepted"))
    core.receive(frame("app/now", 3))
    core.unlink()
    core.receive(frame("app/late", 4))
    assert [r[1] for r in client.records if r[0] == "message"] == [({"type": "app/now", "payload": 3},)]
    assert client.warnings == [
        "unexpectedly received a custom message app/early, while the client is connected",
        "unexpectedly received a custom message app/early, while the client is linking",
    ]
    assert client.notes == ["unexpectedly received a custom message app/late, while the client is unlinking"]


def test_wrong_status_calls_raise_clear_errors():
    """Each call is allowed only in the statuses of the official client's ``canOnly`` checks; otherwise a
    ``ClientError`` names the call and the status, and nothing changes."""
    core = ClientProtocol()
    for call in (lambda: core.link("simon"), core.unlink, core.leave, lambda: core.send({"type": "a/b"}),
                 core.disconnect, core.closed):
        status = core.status
        try:
            call()
        except ClientError as error:
            assert str(error).startswith("cannot ") and str(error).endswith(f"when the client is {status}")
        assert core.status == status
    with pytest.raises(ClientError, match="^cannot link when the client is initializing$"):
        core.link("simon")
    with pytest.raises(ClientError, match="^cannot disconnect when the client is initializing$"):
        core.disconnect(force=True)
    core.connect()
    with pytest.raises(ClientError, match="^cannot connect when the client is connecting$"):
        core.connect()
    with pytest.raises(ClientError, match="^cannot disconnect when the client is connecting$"):
        core.disconnect()
    core.connected()
    with pytest.raises(ClientError, match="^cannot send when the client is connected$"):
        core.send({"type": "app/x"})
    with pytest.raises(ClientError, match="^cannot unlink when the client is connected$"):
        core.unlink()
    core.link("simon")
    core.receive(frame("krmx/accepted"))
    with pytest.raises(ClientError, match="^cannot link when the client is linked$"):
        core.link("lisa")
    with pytest.raises(ClientError, match="^cannot disconnect when the client is linked$"):
        core.disconnect()
    core.disconnect(force=True)
    assert core.status == "closing"
    assert set(ALLOWED["disconnect"]) < set(ALLOWED["disconnect(force=True)"]) <= set(CLIENT_STATUSES)


def test_send_refuses_the_krmx_prefix_and_bad_messages():
    """``send`` builds the frame of a dict with a string type; a ``krmx/`` type, a missing type and a value
    JSON cannot hold are refused with ``ClientError``."""
    client = Recorded()
    client.linked_as("simon", about("krmx/joined", "simon"), about("krmx/linked", "simon"))
    core = client.core
    assert orjson.loads(core.send({"type": "app/say", "payload": {"text": "hé"}})) == {
        "type": "app/say", "payload": {"text": "hé"},
    }
    with pytest.raises(ClientError, match="internal 'krmx/' prefix"):
        core.send({"type": "krmx/leave"})
    with pytest.raises(ClientError, match="string 'type'"):
        core.send({"payload": 1})
    with pytest.raises(ClientError, match="string 'type'"):
        core.send("app/say")  # type: ignore[arg-type]
    with pytest.raises(ClientError, match="JSON-serialisable"):
        core.send({"type": "app/x", "payload": object()})
    with pytest.raises(ClientError, match="NaN or an infinity"):
        core.send({"type": "app/x", "payload": {"x": None, "y": float("nan")}})
    deep: list = []
    for _ in range(200):
        deep = [deep]
    with pytest.raises(ClientError, match="deeper than 128"):
        core.send({"type": "app/x", "payload": deep})
    assert orjson.loads(core.send({"type": "app/x", "payload": None})) == {"type": "app/x", "payload": None}
    with pytest.raises(TypeError):
        ClientProtocol().link(42)  # type: ignore[arg-type]


def test_link_frame_carries_the_auth_only_when_given():
    """The ``krmx/link`` payload has username and version, plus ``auth`` only when one is given."""
    core = ClientProtocol()
    core.connect()
    core.connected()
    assert orjson.loads(core.link("simon", "token")) == {
        "type": "krmx/link", "payload": {"username": "simon", "version": "0.5.5", "auth": "token"},
    }


def test_frames_that_are_not_krmx_messages_are_ignored_with_a_warning():
    """Garbage from the server (not JSON, not an object, no string type, a krmx message about an unknown
    user or without a username, an unknown krmx type) changes nothing and emits nothing."""
    client = Recorded()
    client.linked_as("simon", about("krmx/joined", "simon"), about("krmx/linked", "simon"))
    before = (list(client.records), client.core.users, client.core.status)
    for data in (b"nope", b"[1]", b'{"type": 1}', about("krmx/linked", "ghost"), about("krmx/unlinked", "ghost"),
                 frame("krmx/joined", {"name": "x"}), frame("krmx/joined"), about("krmx/exploded", "simon")):
        client.core.receive(data)
    assert (client.records, client.core.users, client.core.status) == before
    assert len(client.warnings) == 8


def test_close_forgets_everything_once():
    """``closed()`` leaves no username and no users, emits ``close`` once even if told twice (the official
    client emits it on a socket error and again on the close), and the client may connect again."""
    client = Recorded()
    client.linked_as("simon", about("krmx/joined", "simon"), about("krmx/linked", "simon"))
    client.core.closed()
    client.core.closed()
    assert client.names().count("close") == 1
    assert client.core.users == [] and client.core.username is None and client.core.status == "closed"
    client.core.connect()
    assert client.core.status == "connecting"


def test_relink_target_follows_the_last_own_link():
    """The user to link again after a drop is the last one this client linked to (with its auth), kept
    through a server-side unlink (a deploy), forgotten when the client unlinks, leaves or disconnects, and
    when the user leaves (kicked, or the server closed)."""
    core = ClientProtocol()
    core.connect()
    core.connected()
    assert core.relink_target is None
    core.link("simon", "token")
    core.receive(frame("krmx/accepted"))
    assert core.relink_target is None  # not before its own link
    core.receive(about("krmx/joined", "simon"))
    core.receive(about("krmx/linked", "simon"))
    assert core.relink_target == ("simon", "token")
    core.receive(about("krmx/unlinked", "simon"))  # the server unlinked us
    assert core.relink_target == ("simon", "token")
    core.closed()
    assert core.relink_target == ("simon", "token")
    core.connect()
    core.connected()
    core.link("other")  # a link of the application's own: the target is that link's, once it is linked
    assert core.relink_target is None
    core.receive(frame("krmx/rejected", {"reason": "no"}))
    assert core.relink_target is None
    core.closed()

    for ending in ("unlink", "leave", "disconnect", "kicked"):
        core = ClientProtocol()
        core.connect()
        core.connected()
        core.link("simon")
        for data in (frame("krmx/accepted"), about("krmx/joined", "simon"), about("krmx/linked", "simon")):
            core.receive(data)
        assert core.relink_target == ("simon", None)
        if ending == "unlink":
            core.unlink()
        elif ending == "leave":
            core.leave()
        elif ending == "disconnect":
            core.disconnect(force=True)
        else:
            core.receive(about("krmx/unlinked", "simon"))
            core.receive(about("krmx/left", "simon"))
        assert core.relink_target is None, ending


def test_a_listener_may_link_again_from_its_own_unlink():
    """As in the official client, a listener of the client's own ``unlink`` may call ``link`` at once: the
    username it set is kept (only the old one is cleared after the event)."""
    core = ClientProtocol()

    def on_event(event: ClientEvent) -> None:
        if event.name == "unlink":
            core.link("lisa")

    core._emit_to = on_event
    core.connect()
    core.connected()
    core.link("simon")
    for data in (frame("krmx/accepted"), about("krmx/joined", "simon"), about("krmx/linked", "simon"),
                 about("krmx/unlinked", "simon")):
        core.receive(data)
    assert core.status == "linking" and core.username == "lisa"


# -- the relink policy ----------------------------------------------------------------------------------------


def test_relink_backoff_is_exponential_bounded_and_fully_jittered():
    """The longest wait doubles from ``base_delay`` up to ``max_delay``; the wait itself is that bound times
    a random number in [0, 1) (full jitter); bad settings are refused."""
    policy = RelinkPolicy(base_delay=0.5, max_delay=3.0, factor=2.0, random=lambda: 0.5)
    assert [policy.cap(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert [policy.delay(n) for n in range(1, 5)] == [0.25, 0.5, 1.0, 1.5]
    assert RelinkPolicy(random=lambda: 0.0).delay(1) == 0.0
    assert RelinkPolicy(max_delay=10.0).cap(10_000) == 10.0  # no overflow for huge attempt numbers
    for bad in ({"max_attempts": 0}, {"base_delay": -1}, {"factor": 0.5}, {"link_timeout": 0}):
        with pytest.raises(ValueError):
            RelinkPolicy(**bad)
    with pytest.raises(ValueError):
        policy.cap(0)


def test_only_an_already_linked_or_timed_out_rejection_is_transient():
    """A relink rejected because the server still holds the old connection, or because its authentication
    timed out, is retried; any other reason (the application's, an unknown user on a closed server) ends the
    relink."""
    assert is_transient_rejection("user simon is already linked to a connection")
    assert is_transient_rejection("authentication timeout")
    assert not is_transient_rejection("authentication failed")
    assert not is_transient_rejection("denied by app")
    assert not is_transient_rejection("server is not accepting new users")
    # An application's reason that merely mentions it is the application's: not retried.
    assert not is_transient_rejection("banned: user simon is already linked to a connection elsewhere")


# -- one server core and N client cores, in memory ------------------------------------------------------------


class Pair:
    """A :class:`ServerProtocol` and client cores, frames carried between them in memory, in order."""

    def __init__(self) -> None:
        self.server = ServerProtocol()
        self.server.listen("s1")
        self.clients: dict[str, Recorded] = {}

    def client(self, name: str) -> Recorded:
        client = Recorded()
        self.clients[name] = client
        self.apply(self.server.connect(name))
        client.core.connect()
        client.core.connected()
        return client

    def apply(self, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, SendFrame):
                self.clients[effect.connection].core.receive(effect.data)
            elif isinstance(effect, Resume):
                self.apply(self.server.resume(effect.connection, effect.ticket))
            elif isinstance(effect, Drain):
                self.apply(self.server.drain(effect.connection))
            elif isinstance(effect, FinishLeave):
                self.apply(self.server.finish_leave(effect.username))
            elif isinstance(effect, CloseNext):
                self.apply(self.server.close_next())

    def send(self, name: Hashable, data: bytes) -> None:
        self.apply(self.server.receive(name, data))

    def drop(self, name: str) -> None:
        self.clients[name].core.closed()
        self.apply(self.server.disconnect(name))


def sort_users(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(users, key=lambda user: user["username"])


def test_pair_every_client_list_equals_the_server_registry():
    """Through joins, links, unlinks, leaves, a server-side join and kick and a drop, every linked client's
    user list equals the server's (as sets), and unlinked clients list nobody."""
    pair = Pair()
    alice, bob, carol = pair.client("A"), pair.client("B"), pair.client("C")

    def check() -> None:
        expected = sort_users(pair.server.users)
        for client in (alice, bob, carol):
            if client.core.status == "linked":
                assert sort_users(client.core.users) == expected
            else:
                assert client.core.users == []

    pair.send("A", alice.core.link("alice"))
    pair.apply(pair.server.join("rik"))
    pair.send("B", bob.core.link("bob"))
    check()
    pair.send("C", carol.core.link("rik"))
    check()
    pair.send("B", bob.core.unlink())
    check()
    pair.send("B", bob.core.link("bob"))
    pair.send("C", carol.core.leave())
    check()
    assert carol.events()[-3:] == [["unlinking"], ["unlink", "rik"], ["leave", "rik"]]
    pair.apply(pair.server.kick("bob"))
    check()
    assert bob.events()[-2:] == [["unlink", "bob"], ["leave", "bob"]]
    pair.send("B", bob.core.link("bob"))
    pair.drop("A")
    check()
    assert pair.server.users == [u("alice", False), u("bob", True)]
    assert bob.core.users == [u("bob", True), u("alice", False)]  # its own user first, from krmx/accepted


def test_pair_rejections_carry_the_servers_reason():
    """The server's rejection reasons reach the client's ``reject`` event word for word, and the client is
    ``connected`` again after each."""
    pair = Pair()
    alice, bob = pair.client("A"), pair.client("B")
    pair.send("A", alice.core.link("alice"))
    for username, reason in (("a", "invalid username"), ("alice", "user alice is already linked to a connection")):
        pair.send("B", bob.core.link(username))
        assert bob.records[-1][:2] == ("reject", (reason,)) and bob.core.status == "connected"
    pair.send("B", bob.core.link("bob"))
    assert bob.core.status == "linked"


def test_a_late_unlinked_connection_rejection_does_not_answer_a_link():
    """An unlink raced the server's own unlink: its rejection ('unlinked connection') arrives after the
    next link request; that link's real answer still comes, and the client links as asked."""
    client = Recorded()
    client.linked_as("carol", about("krmx/joined", "carol"), about("krmx/linked", "carol"))
    core = client.core
    core.unlink()
    core.receive(about("krmx/unlinked", "carol"))
    core.link("dora")
    core.receive(frame("krmx/rejected", {"reason": "unlinked connection"}))
    assert core.status == "linking" and core.username == "dora"
    core.receive(frame("krmx/accepted"))
    assert (core.status, core.username) == ("linked", "dora")
    assert "reject" not in client.names() and any("late rejection" in w for w in client.warnings)


def test_a_rejection_while_linked_leaves_no_user_list():
    """A stray krmx/rejected while linked (a server that does not follow Krmx) ends the link, and with it the
    user list, which is held only while linked: the list stayed as it was."""
    client = Recorded()
    client.linked_as("carol", about("krmx/joined", "bob"), about("krmx/joined", "carol"), about("krmx/linked", "carol"))
    client.core.receive(frame("krmx/rejected", {"reason": "late"}))
    assert (client.core.status, client.core.username, client.core.users) == ("connected", None, [])


def test_an_accept_without_a_link_request_is_ignored():
    client = Recorded()
    client.core.connect()
    client.core.connected()
    client.core.receive(frame("krmx/accepted"))
    assert client.core.status == "connected" and "accept" not in client.names()
    assert any("krmx/accepted" in w for w in client.warnings)


def test_an_accept_crossing_the_clients_own_disconnect_is_a_note():
    client = Recorded()
    client.core.connect()
    client.core.connected()
    client.core.link("simon")
    client.core.disconnect(True)
    client.core.receive(frame("krmx/accepted"))
    assert client.warnings == [] and client.notes == [
        "ignored krmx/accepted while the client is closing (no link request is pending)"
    ]


def test_asking_to_close_twice_is_one_closing():
    client = Recorded()
    client.linked_as("ann")
    client.core.disconnect(force=True)
    client.core.disconnect(force=True)
    assert client.names().count("closing") == 1
