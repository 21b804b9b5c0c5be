"""The Krmx server protocol as a sans-I/O state machine.

Inputs go in (a connection opened, a frame received, a connection closed, an authentication result, a
server-side call); a list of *effects* comes out, in the order they must take effect:

- :class:`Record`: an event to append to the log. The registry projection has already been fed it; a
  listener for it may run only once it is committed.
- :class:`SendFrame`: bytes to write, as a text frame, to one connection.
- :class:`CloseConnection`: a connection to terminate.
- :class:`Authenticate`: ask the application whether a link request may proceed; answer with
  :meth:`ServerProtocol.authenticated`.
- :class:`Resume`, :class:`Drain`, :class:`FinishLeave`, :class:`CloseNext`: call the core back (``resume``,
  ``drain``, ``finish_leave``, ``close_next``) once the listeners of the effects before them ran: a new
  user's link after its join, the frames that waited behind a link, a leave's second step, the next user of
  a close. A driver that drops one leaves a link, a leave or a close half done.

No sockets, no clock, no disk: the driver sets :attr:`ServerProtocol.now` (UTC microseconds) before each
input, appends the recorded events, writes the frames and calls the listeners. Every rule of KRMX.md lives
in this module; users change only through :func:`events.apply`.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from events import Broadcast, Close, Cutoff, Event, Join, Leave, Link, Listen, Message, Registry, Send, Unlink, apply
from events.model import dumps, holds_non_finite
from events.projection import recovery_events

from .errors import ServerError

__all__ = [
    "ServerProtocol",
    "Record",
    "SendFrame",
    "Rejection",
    "CloseConnection",
    "Authenticate",
    "Resume",
    "Drain",
    "FinishLeave",
    "CloseNext",
    "Effect",
    "is_valid_username",
    "parse_frame",
    "DEFAULT_VERSIONS",
    "PROTOCOL_VERSION",
]

#: The protocol version our server and client speak (the official 0.5.x clients send "0.5.x").
PROTOCOL_VERSION = "0.5.5"
#: Client versions accepted by default: the published 0.5 and 0.6 lines.
DEFAULT_VERSIONS = ("0.5", "0.6")

_USERNAME = re.compile(r"[a-zA-Z](?!.*[._@-]{2})[a-zA-Z0-9._@-]{0,30}[a-zA-Z0-9]")


def is_valid_username(username: str) -> bool:
    """The Krmx default rule: 2-32 ASCII letters, digits and ``. - @ _``, starting with a letter, ending
    with a letter or digit, no two special characters in a row."""
    return _USERNAME.fullmatch(username) is not None


# -- effects ------------------------------------------------------------------------------------------------

#: Where a frame may start to hold an auth string, in any spelling a broken frame may have (a key in any case,
#: quoted or not, or escaped): a log line shows what comes before, never from there on.
_MAY_HOLD_AUTH = re.compile(r"auth|\\u|\\x", re.IGNORECASE)
FRAME_EXCERPT = 80


def frame_excerpt(data: str | bytes) -> str:
    """The start of a frame, for a log line about why it unlinked its user: at most FRAME_EXCERPT characters,
    and nothing from where an auth string may start (a malformed link may hold one)."""
    text = data[: FRAME_EXCERPT + 1]
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    secret = _MAY_HOLD_AUTH.search(text)
    if secret is not None:
        return text[: secret.start()] + "[cut: may hold auth]"
    return text if len(text) <= FRAME_EXCERPT else text[:FRAME_EXCERPT] + "..."


@dataclass(slots=True)
class Record:
    event: Event
    #: For the driver's log line, not the log: what the client sent that unlinked it (see ``frame_excerpt``).
    detail: str | None = None


@dataclass(slots=True)
class SendFrame:
    connection: Hashable
    data: bytes


@dataclass(slots=True)
class Rejection(SendFrame):
    """The ``krmx/rejected`` frame of a link request, with what a log line about it needs."""

    username: str | None = None
    reason: str = ""


@dataclass(slots=True)
class CloseConnection:
    connection: Hashable
    reason: str


@dataclass(slots=True)
class Authenticate:
    connection: Hashable
    ticket: int
    username: str
    is_new_user: bool
    auth: str | None


@dataclass(slots=True)
class Resume:
    """Call :meth:`ServerProtocol.resume` here, after the listeners of the effects before it ran.

    A new user's link waits behind its join, so the join listeners see the user joined but not linked
    (as in the reference, where they run synchronously in between)."""

    connection: Hashable
    ticket: int


@dataclass(slots=True)
class Drain:
    """Call :meth:`ServerProtocol.drain` here, after the listeners of the effects before it ran.

    Frames that waited behind a link are handled one at a time, each after the listeners of the one
    before (the link's first), as they would have been had they arrived later."""

    connection: Hashable


@dataclass(slots=True)
class FinishLeave:
    """Call :meth:`ServerProtocol.finish_leave` here, after the listeners of the effects before it ran.

    A linked user leaves in two steps, as in the reference, where listeners run synchronously in between: it
    is unlinked (the unlink listeners see it unlinked, still in the lobby, and what they send arrives before
    ``krmx/left``), then it leaves. Meanwhile no connection may link to it."""

    username: str


@dataclass(slots=True)
class CloseNext:
    """Call :meth:`ServerProtocol.close_next` here, after the listeners of the effects before it ran.

    Closing takes the users one at a time, each after the listeners of the one before, so that what those
    listeners send reaches the users still linked (as in the reference)."""


Effect = Record | SendFrame | CloseConnection | Authenticate | Resume | Drain | FinishLeave | CloseNext


# -- frames -------------------------------------------------------------------------------------------------


#: The reason of the close frame every connection gets when the server closes (a client need not warn of it).
SERVER_CLOSED = "server closed"

#: Nesting levels a message may have (the frame's object is level 1). Game payloads stay far below it; the
#: log stores a message one level deeper, and orjson writes at most 254 levels (it reads 1024).
MAX_DEPTH = 128
# 254 - MAX_DEPTH nested lists, the innermost holding the value too_deep checks: orjson writes 254 levels at most.
_NEST_INNER: list[Any] = [None]
_NEST_OUTER: list[Any] = _NEST_INNER
for _ in range(254 - MAX_DEPTH - 1):
    _NEST_OUTER = [_NEST_OUTER]

# A JSON string escape in the raw text: an escaped backslash (skipped, so that ``\\\\ud83d`` is no escape),
# a surrogate pair (kept), or a lone surrogate (the group: replaced).
_SURROGATE_ESCAPES = re.compile(
    rb"\\\\|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|(\\u[dD][89a-fA-F][0-9a-fA-F]{2})"
)


def _replace_lone_surrogate(match: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if match.group(1) else match.group(0)


def loads(data: str | bytes) -> Any:
    """``orjson.loads``, except that a lone UTF-16 surrogate escape (``"\\ud83d"``, what JavaScript's
    ``JSON.stringify`` writes for half an emoji, and the reference server passes on) and bytes that are not
    UTF-8 read as U+FFFD, the replacement character: the log and every frame stay valid UTF-8. Raises
    ``orjson.JSONDecodeError``."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
        # Bytes that are not UTF-8 (only a binary frame can carry them: websockets refuses such a text frame)
        # read as U+FFFD too, as the reference server reads them.
        fixed = raw.decode(errors="replace").encode()
        if b"\\u" in fixed:
            fixed = _SURROGATE_ESCAPES.sub(_replace_lone_surrogate, fixed)
        if fixed == raw:
            raise
        return orjson.loads(fixed)


def parse_frame(data: str | bytes) -> dict[str, Any] | None:
    """A Krmx message, or ``None`` when the frame is not a JSON object with a string ``type`` (strict JSON, see
    :func:`loads`; binary frames are UTF-8 like text frames; nesting deeper than :data:`MAX_DEPTH` is invalid)."""
    try:
        message = loads(data)
    except orjson.JSONDecodeError:
        return None
    if type(message) is not dict or type(message.get("type")) is not str or too_deep(message, data):
        return None
    return message


def too_deep(value: Any, text: str | bytes) -> bool:
    """Whether ``value`` (``text`` as JSON) nests deeper than :data:`MAX_DEPTH`. Most messages are answered by
    their length or by counting their brackets (fewer than the limit cannot nest that deep); the others by
    orjson itself, in C: it writes at most 254 levels, so ``value`` under 254 - MAX_DEPTH more lists fails to
    encode exactly when it nests deeper than MAX_DEPTH."""
    if len(text) <= 2 * MAX_DEPTH:  # each level opens and closes: too short to nest that deep (most frames)
        return False
    opening = b"[{" if isinstance(text, bytes) else "[{"
    if text.count(opening[0:1]) + text.count(opening[1:2]) <= MAX_DEPTH:
        return False
    _NEST_INNER[0] = value  # the lists are made once: new ones would wake the garbage collector
    try:
        orjson.dumps(_NEST_OUTER)
    except orjson.JSONEncodeError as error:
        if "Recursion limit" in str(error):
            return True
        raise
    finally:
        _NEST_INNER[0] = None
    return False


def unsendable(message: Any, data: bytes) -> str | None:
    """Why ``data``, the JSON of an application's ``message``, is not that message, or ``None``: orjson writes
    ``NaN`` and infinities as ``null`` (silently), and a peer refuses nesting deeper than :data:`MAX_DEPTH`."""
    if holds_non_finite(message, data):
        return "message holds NaN or an infinity, which JSON cannot carry (it would arrive as null)"
    if too_deep(message, data):
        return f"message nests deeper than {MAX_DEPTH} levels"
    return None


def encode(type_: str, payload: Any = None) -> bytes:
    if payload is None:
        return dumps({"type": type_})
    return dumps({"type": type_, "payload": payload})


def _about(type_: str, username: str) -> bytes:
    return dumps({"type": type_, "payload": {"username": username}})


ACCEPTED = encode("krmx/accepted")


_PROTOCOL_REASONS = frozenset(
    {
        "invalid message",
        "unlinked connection",
        "invalid link request",
        "invalid username",
        "server is not accepting new users",
        "lobby is full",
        "authentication timeout",
        "server is closing",
        "server is closed",
    }
)


def _reason_kind(reason: str) -> str:
    """A rejection reason without its variable part (a bounded set, for metrics labels)."""
    if reason in _PROTOCOL_REASONS:
        return reason
    if reason.startswith("krmx server version mismatch"):
        return "version mismatch"
    if reason.endswith("is already linked to a connection"):
        return "already linked"
    if reason.endswith("left before the link completed"):
        return "user left"
    return "authenticate"  # the application's own reasons


def as_dict(message: Any) -> Any:
    """A message is a dict on the wire: another mapping (an OrderedDict, a MappingProxyType) is taken as one."""
    return message if type(message) is dict or not isinstance(message, Mapping) else dict(message)


def rejected(reason: str) -> bytes:
    return encode("krmx/rejected", {"reason": reason})


# -- connection state ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Connection:
    username: str | None = None
    #: The ticket of the authentication this connection waits for; its later frames queue meanwhile.
    pending: int | None = None
    pending_link: tuple[str, str | None] | None = None
    queue: deque[str | bytes] = field(default_factory=deque)


class ServerProtocol:
    """One lobby's Krmx server rules. Drive it from one thread; every method returns the effects to apply."""

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        lobby: str = "main",
        accept_new_users: bool = True,
        username_predicate: Callable[[str], bool] = is_valid_username,
        versions: Iterable[str] = DEFAULT_VERSIONS,
        authenticates: bool = False,
        max_users: int | None = None,
    ) -> None:
        self.registry = registry if registry is not None else Registry()
        self.lobby = lobby
        self.session: str | None = None
        self.accept_new_users = accept_new_users
        #: Users at most that links may create (the application's own joins are not refused, and count).
        self.max_users = max_users
        self.username_predicate = username_predicate
        self.versions = tuple(versions)
        if not self.versions:
            raise ValueError("at least one protocol version must be accepted")
        #: Whether link requests go to the application (an authenticate listener exists).
        self.authenticates = authenticates
        self.status = "initializing"
        #: The time of the current input, set by the driver.
        self.now = 0
        self._connections: dict[Hashable, _Connection] = {}
        self._user_connection: dict[str, Hashable] = {}
        #: Users accepted and joined whose link waits for a Resume: taken for rule 7, not yet linked.
        self._linking: dict[str, Hashable] = {}
        #: Users unlinked by a leave that ends after the unlink's listeners (a FinishLeave): the leave's reason
        #: and the connection that hears its own left. Taken for rule 7 too: the leave comes first.
        self._leaving: dict[str, tuple[str, Hashable]] = {}
        #: Connections whose waiting frames wait for the end of such a leave (see drain).
        self._drain_after_leave: set[Hashable] = set()
        self._tickets = 0
        self._keep_users = False  # what close() was asked to do with them
        self._out: list[Effect] = []
        #: Link rejections by reason, for metrics.
        self.rejections: Counter[str] = Counter()

    # -- queries ----------------------------------------------------------------------------------------

    @property
    def users(self) -> list[dict[str, Any]]:
        return self.registry.as_list()

    def connection_of(self, username: str) -> Hashable | None:
        return self._user_connection.get(username)

    def username_of(self, connection: Hashable) -> str | None:
        state = self._connections.get(connection)
        return state.username if state is not None else None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # -- helpers ----------------------------------------------------------------------------------------

    def _take(self) -> list[Effect]:
        out, self._out = self._out, []
        return out

    def _record(self, event: Event, detail: str | None = None) -> None:
        apply(self.registry, event)
        self._out.append(Record(event, detail))

    def _common(self) -> dict[str, Any]:
        assert self.session is not None
        return {"lobby": self.lobby, "session": self.session, "at": self.now}

    def _reject(self, connection: Hashable, reason: str, username: str | None = None) -> None:
        self.rejections[_reason_kind(reason)] += 1
        self._out.append(Rejection(connection, rejected(reason), username, reason))

    def _send(self, connection: Hashable, data: bytes) -> None:
        self._out.append(SendFrame(connection, data))

    def _to_linked(self, data: bytes, skip: str | None = None) -> None:
        for username, connection in self._user_connection.items():
            if username != skip:
                self._out.append(SendFrame(connection, data))

    def _valid(self, username: str) -> bool:
        try:
            return bool(self.username_predicate(username))
        except Exception:  # an application predicate that fails says no
            return False

    def _can_only(self, action: str, *statuses: str) -> None:
        if self.status not in statuses:
            raise ServerError(f"cannot {action} when the server is {self.status}")

    # -- lifecycle of the server ------------------------------------------------------------------------

    def listen(self, session: str, port: int | None = None) -> list[Effect]:
        """Start ``session``: record ``listen``, then recover a previous session that never closed."""
        self._can_only("start listening", "initializing", "starting")
        self.session = session
        self.status = "listening"
        previous = self.registry.copy()
        self._record(Listen(**self._common(), port=port))
        for event in recovery_events(previous, session=session, at=self.now):
            self._record(event)
        return self._take()

    def close(self, *, keep_users: bool = False) -> list[Effect]:
        """Krmx ``close()``: every user leaves (kicked) in join order, one at a time (see :class:`CloseNext`),
        then every connection is closed and ``close`` is recorded. With ``keep_users`` (a deploy) linked users
        are unlinked with reason ``server restart`` instead and stay in the lobby for the next start."""
        self._can_only("close", "listening")
        for username in list(self._leaving):  # a leave under way (close called by a listener) ends first
            self._part(username, *self._leaving.pop(username))
        self.status = "closing"
        self._keep_users = keep_users
        self._linking.clear()
        for state in self._connections.values():
            state.pending = None  # a link whose authentication is still pending is not accepted
        return self.close_next()

    def close_next(self) -> list[Effect]:
        """The next step of :meth:`close`: the next user leaves (or is unlinked); after the last one, the
        connections close and ``close`` is recorded."""
        if self.status != "closing":
            return []
        if self._keep_users:
            linked = self.registry.linked()
            if linked:
                self._unlink(linked[0], "server restart")
                self._out.append(CloseNext())
                return self._take()
        elif self.registry.users:
            self._leave(next(iter(self.registry.users)), "close")  # its last step asks for the next one
            return self._take()
        for connection in self._connections:
            self._out.append(CloseConnection(connection, SERVER_CLOSED))
        self._connections.clear()
        self._record(Close(**self._common(), reason="server restart" if self._keep_users else "close"))
        return self._take()

    def closed(self) -> None:
        """The driver finished closing (listeners ran, sockets closed)."""
        self.status = "closed"

    # -- connections ------------------------------------------------------------------------------------

    def connect(self, connection: Hashable) -> list[Effect]:
        if connection in self._connections:
            raise ServerError(f"connection {connection!r} is already open")
        if self.status != "listening":
            return [CloseConnection(connection, f"server is {self.status}")]
        self._connections[connection] = _Connection()
        return []

    def disconnect(self, connection: Hashable, reason: str = "dropped") -> list[Effect]:
        """The connection is gone (close frame, drop, missed pings, a cut-off): unlink its user if linked."""
        state = self._connections.pop(connection, None)
        if state is not None and state.username is not None:
            self._unlink(state.username, reason)
        return self._take()

    def cut_off(self, connection: Hashable, label: str | None, reason: str) -> list[Effect]:
        """A limit cut ``connection`` off (the driver decided: a slow reader, a flood, no link in time, a
        frame too large, missed pongs): record it, unlink its user with the same reason, close it. It hears
        nothing more. ``label`` names the connection in the log; a connection refused before it opened
        (``connection`` unknown here) is recorded too."""
        state = self._connections.pop(connection, None)
        if (state is None and label is not None) or self.status != "listening":
            return [CloseConnection(connection, reason)] if state is not None else []
        username = state.username if state is not None else None
        self._record(Cutoff(**self._common(), connection=label, reason=reason, username=username))
        if username is not None:
            self._unlink(username, reason)
        if state is not None:
            self._out.append(CloseConnection(connection, reason))
        return self._take()

    def receive(self, connection: Hashable, data: str | bytes) -> list[Effect]:
        """A frame arrived on ``connection`` (text or binary, handled alike)."""
        state = self._connections.get(connection)
        if state is None:
            return []
        if state.pending is not None or state.queue:
            state.queue.append(data)
            return []
        self._handle(connection, state, data)
        return self._take()

    def _handle(self, connection: Hashable, state: _Connection, data: str | bytes) -> None:
        message = parse_frame(data)
        if state.username is None:
            if message is None:
                self._reject(connection, "invalid message")
            else:
                self._link_request(connection, state, message)
            return
        username = state.username
        if message is None:
            self._unlink(username, "invalid message", frame_excerpt(data))
            return
        type_ = message["type"]
        if type_ == "krmx/link" or type_ == "krmx/unlink":
            self._unlink(username, "requested" if type_ == "krmx/unlink" else "link while linked")
        elif type_ == "krmx/leave":
            self._leave(username, "requested")
        elif type_.startswith("krmx/"):
            self._unlink(username, "reserved type", frame_excerpt(type_))
        else:
            self._record(Message(**self._common(), username=username, message=message))

    # -- linking ----------------------------------------------------------------------------------------

    def _link_request(self, connection: Hashable, state: _Connection, message: dict[str, Any]) -> None:
        if message["type"] != "krmx/link":
            self._reject(connection, "unlinked connection")
            return
        payload = message.get("payload")
        if (
            type(payload) is not dict
            or type(payload.get("username")) is not str
            or type(payload.get("version")) is not str
            or ("auth" in payload and type(payload["auth"]) is not str)
        ):
            self._reject(connection, "invalid link request")
            return
        username: str = payload["username"]
        version: str = payload["version"]
        auth: str | None = payload.get("auth")
        if not any(version.startswith(accepted) for accepted in self.versions):
            server = "|".join(f"{accepted}.*" for accepted in self.versions)
            shown = version if len(version) <= 64 else version[:64] + "..."  # not a frame's size, echoed and logged
            self._reject(connection, f"krmx server version mismatch (server={server},client={shown})", username)
            return
        if not self._valid(username):
            self._reject(connection, "invalid username", username)
            return
        reason = self._link_blocker(username)
        if reason is not None:
            self._reject(connection, reason, username)
            return
        if not self.authenticates:
            self._accept(connection, state, username, auth)
            return
        self._tickets += 1
        state.pending = self._tickets
        state.pending_link = (username, auth)
        self._out.append(
            Authenticate(connection, self._tickets, username, username not in self.registry.users, auth)
        )

    def _link_blocker(self, username: str) -> str | None:
        """Rules 6 and 7: the rejection reason, if any, for linking to ``username`` now."""
        linked = self.registry.users.get(username)
        if linked is None and not self.accept_new_users:
            return "server is not accepting new users"
        if linked is None and self.max_users is not None and len(self.registry.users) >= self.max_users:
            return "lobby is full"
        if linked or username in self._linking or username in self._leaving:
            return f"user {username} is already linked to a connection"
        return None

    def authenticated(self, connection: Hashable, ticket: int, reason: str | None) -> list[Effect]:
        """The application's answer to :class:`Authenticate`: ``None`` accepts, a string rejects.

        What may have changed meanwhile is checked again: the connection closed (nothing happens), the
        server is closing (not accepted), the user got linked or removed (rules 6 and 7 again)."""
        state = self._connections.get(connection)
        if state is None or state.pending != ticket or state.pending_link is None:
            return []
        username, auth = state.pending_link
        state.pending = None
        state.pending_link = None
        if reason is None and self.status != "listening":
            reason = f"server is {self.status}"
        if reason is None:
            reason = self._link_blocker(username)
        if reason is not None:
            self._reject(connection, reason, username)
        else:
            self._accept(connection, state, username, auth)
        self._drain(connection, state)
        return self._take()

    def resume(self, connection: Hashable, ticket: int) -> list[Effect]:
        """Link a new user after its join listeners ran (see :class:`Resume`)."""
        state = self._connections.get(connection)
        if state is None or state.pending != ticket or state.pending_link is None:
            # The connection closed (or the server closed) meanwhile: the user stays joined and unlinked.
            for username, waiting in list(self._linking.items()):
                if waiting == connection:
                    del self._linking[username]
            return self._take()
        username, auth = state.pending_link
        del self._linking[username]
        state.pending = None
        state.pending_link = None
        if username in self.registry.users:
            self._link(connection, state, username, auth)
        else:  # a join listener kicked the user before its link
            self._reject(connection, f"user {username} left before the link completed", username)
        self._drain(connection, state)
        return self._take()

    def _drain(self, connection: Hashable, state: _Connection) -> None:
        """Frames waited behind an authentication or a link: ask for :meth:`drain` once the listeners of what
        was just done have run."""
        if state.queue and state.pending is None and connection in self._connections:
            self._out.append(Drain(connection))

    def queued(self, connection: Hashable) -> bool:
        """Whether frames of ``connection`` wait behind a link (see :class:`Drain`)."""
        state = self._connections.get(connection)
        return state is not None and bool(state.queue)

    def drain(self, connection: Hashable) -> list[Effect]:
        """Handle the next frame that waited behind a link (see :class:`Drain`); ask again for the rest."""
        state = self._connections.get(connection)
        if state is None or state.pending is not None or not state.queue:
            return []
        if any(leaving == connection for _, leaving in self._leaving.values()):
            # A listener of its link made its user leave: its next frame waits for the leave's end (_part).
            self._drain_after_leave.add(connection)
            return []
        self._handle(connection, state, state.queue.popleft())
        self._drain(connection, state)
        return self._take()

    def _accept(self, connection: Hashable, state: _Connection, username: str, auth: str | None) -> None:
        self._send(connection, ACCEPTED)
        if username in self.registry.users:
            self._link(connection, state, username, auth)
            return
        self._join(username)
        self._tickets += 1
        state.pending = self._tickets
        state.pending_link = (username, auth)
        self._linking[username] = connection
        self._out.append(Resume(connection, self._tickets))

    def _link(self, connection: Hashable, state: _Connection, username: str, auth: str | None) -> None:
        # The new connection learns every user in join order, itself included; the others learn it linked.
        event = Link(**self._common(), username=username, auth=auth is not None)
        apply(self.registry, event)
        state.username = username
        self._user_connection[username] = connection
        out = self._out
        for other, linked in self.registry.users.items():
            out.append(SendFrame(connection, _about("krmx/joined", other)))
            if linked:
                out.append(SendFrame(connection, _about("krmx/linked", other)))
        self._to_linked(_about("krmx/linked", username), skip=username)
        out.append(Record(event))

    # -- the user lifecycle, shared by client frames and server calls ----------------------------------

    def _join(self, username: str) -> None:
        self._to_linked(_about("krmx/joined", username))
        self._record(Join(**self._common(), username=username))

    def _unlink(self, username: str, reason: str, detail: str | None = None) -> None:
        data = _about("krmx/unlinked", username)
        connection = self._user_connection.pop(username)
        state = self._connections.get(connection)
        if state is not None:  # still open: it hears its own unlink too
            state.username = None
            self._send(connection, data)
        self._to_linked(data)
        self._record(Unlink(**self._common(), username=username, reason=reason), detail)

    def _leave(self, username: str, reason: str) -> None:
        connection = self._user_connection.get(username)
        if connection is None:
            self._part(username, reason, None)
            return
        self._unlink(username, reason)
        self._leaving[username] = (reason, connection)
        self._out.append(FinishLeave(username))

    def finish_leave(self, username: str) -> list[Effect]:
        """The second step of a linked user's leave, after its unlink's listeners ran (see :class:`FinishLeave`)."""
        pending = self._leaving.pop(username, None)
        if pending is not None:  # else a listener of its unlink made it leave already
            self._part(username, *pending)
        return self._take()

    def _part(self, username: str, reason: str, connection: Hashable | None) -> None:
        left = _about("krmx/left", username)
        if connection is not None and connection in self._connections:
            self._send(connection, left)
        self._to_linked(left)
        self._record(Leave(**self._common(), username=username, reason=reason))
        if connection in self._drain_after_leave:
            self._drain_after_leave.discard(connection)
            self._out.append(Drain(connection))
        if self.status == "closing":
            self._out.append(CloseNext())

    # -- the server API ---------------------------------------------------------------------------------

    def _existing(self, username: str, action: str) -> bool:
        if not isinstance(username, str):
            raise ServerError(f"cannot {action} {username!r}: a username is a string")
        linked = self.registry.users.get(username)
        if linked is None:
            raise ServerError(f"cannot {action} a user that does not exist ({username!r})")
        return linked

    def join(self, username: str) -> list[Effect]:
        """Server-side join: the user starts unlinked."""
        self._can_only("join a user", "listening")
        if not isinstance(username, str) or not self._valid(username):
            raise ServerError(f"cannot join a user with an invalid username ({username!r})")
        if username in self.registry.users:
            raise ServerError(f"cannot join a user that already exists ({username!r})")
        self._join(username)
        return self._take()

    def kick(self, username: str) -> list[Effect]:
        self._can_only("kick a user", "listening")
        self._existing(username, "kick")
        # A user whose leave is under way (kicked or leaving, its unlink's listeners still to run or running)
        # leaves at that leave's own step, with its reason: a second leave now would come before those listeners.
        if username not in self._leaving:
            self._leave(username, "kick")
        return self._take()

    def unlink(self, username: str, reason: str = "server") -> list[Effect]:
        self._can_only("unlink a user", "listening", "closing")
        if not self._existing(username, "unlink"):
            raise ServerError(f"cannot unlink a user that is not linked ({username!r})")
        self._unlink(username, reason)
        return self._take()

    def send(self, username: str, message: dict[str, Any]) -> list[Effect]:
        # While closing, the listeners of each user's leave run while the later users are still linked.
        self._can_only("send a message", "listening", "closing")
        sent, data = self._custom(message)
        if not self._existing(username, "send a message to"):
            raise ServerError(f"cannot send a message to a user that is not linked ({username!r})")
        self._record(Send(**self._common(), username=username, message=sent))
        self._send(self._user_connection[username], data)
        return self._take()

    def broadcast(self, message: dict[str, Any], skip: str | None = None) -> list[Effect]:
        self._can_only("broadcast a message", "listening", "closing")
        if skip is not None and not isinstance(skip, str):
            raise ServerError(f"skip is one username (a string) or None, not {skip!r}")
        sent, data = self._custom(message)
        if self.registry.closed:  # listeners of a close: nobody is linked any more, nothing to send or record
            return self._take()
        self._record(Broadcast(**self._common(), message=sent, skip=skip))
        self._to_linked(data, skip=skip)
        return self._take()

    @staticmethod
    def _custom(message: dict[str, Any]) -> tuple[Any, bytes]:
        """An application message as recorded (read back from its JSON) and its frame; raise unless it is a JSON
        object with a non-``krmx/`` type. The record is a copy: the app may go on changing its dict after the
        call, before the record is committed, and the log must hold what was sent."""
        if type(message) is not dict or type(message.get("type")) is not str:
            raise ServerError(f"a message must be a dict with a string 'type', not {message!r:.100}")
        if message["type"].startswith("krmx/"):
            raise ServerError(f"the krmx/ prefix is reserved for the protocol: {message['type']!r}")
        try:
            data = dumps(message)
        except TypeError as error:
            raise ServerError(f"message is not JSON-serialisable: {error}") from None
        problem = unsendable(message, data)
        if problem is not None:
            raise ServerError(problem)
        try:
            sent = orjson.loads(data)  # raw JSON (an orjson.Fragment) is recorded as it reads back
        except orjson.JSONDecodeError as error:
            raise ServerError(f"message holds raw JSON (an orjson.Fragment) that does not read back: {error}") from None
        if type(sent) is not dict or type(sent.get("type")) is not str or sent["type"].startswith("krmx/"):
            # Raw JSON with a "type" key of its own: the last one is what the client reads.
            raise ServerError(f"message reads back with another type (raw JSON in it): {data[:100]!r}")
        return sent, data
