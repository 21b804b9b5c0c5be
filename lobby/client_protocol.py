"""The Krmx client protocol as a sans-I/O state machine, the twin of :mod:`lobby.protocol`.

The driver (:class:`lobby.client.Client`, or a test) tells the core what happened to the connection
(:meth:`ClientProtocol.connect`, :meth:`~ClientProtocol.connected`, :meth:`~ClientProtocol.closed`), hands it
every frame the server sent (:meth:`~ClientProtocol.receive`) and asks it for the frames of the calls
(:meth:`~ClientProtocol.link`, :meth:`~ClientProtocol.unlink`, :meth:`~ClientProtocol.leave`,
:meth:`~ClientProtocol.send`), which raise :class:`~lobby.errors.ClientError` in the wrong status. The core
emits :class:`ClientEvent` objects through its ``emit`` callback, synchronously, at the exact point where the
official client ``@krmx/client`` 0.5.4 emits them, so a listener sees the state the official client's
listeners see (for example during its own ``unlink`` the status is already ``connected`` and the user list
empty, but :attr:`~ClientProtocol.username` still names the user; it is cleared right after).

No sockets, no clock: every rule of the client side lives here, including the user-list bookkeeping of the
official client (its subtle cases are spelt out in :meth:`ClientProtocol.receive`) and the choice of the
user to link again after a drop (:attr:`ClientProtocol.relink_target`). Where the backoff of an automatic
relink comes from is :class:`RelinkPolicy`; sleeping and reconnecting are the driver's.

Deliberate differences from the official client, each a fix of something it leaves undefined:

- ``link()`` completes on the client's *own* ``link`` event (the official one resolves on the first ``link``
  event of the burst, which may be another user's).
- ``leave()`` moves to ``unlinking`` until the server confirms (the official one jumps to ``connected`` at
  once, while it is still linked on the server).
- A ``krmx/linked`` or ``krmx/unlinked`` about a user the client does not know, and a frame that is not a
  Krmx message, are ignored with a warning (the official client throws from its socket handler).
- ``close`` is emitted once per connection (the official client emits it on a socket error and again on the
  socket's close).
"""

from __future__ import annotations

import logging
import random as _random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import ClientError
from .protocol import PROTOCOL_VERSION, loads, unsendable

__all__ = [
    "ClientProtocol",
    "ClientEvent",
    "RelinkPolicy",
    "CLIENT_EVENTS",
    "CLIENT_STATUSES",
    "ALLOWED",
    "is_transient_rejection",
]

#: Every status of a client, in the order a session passes through them.
CLIENT_STATUSES = ("initializing", "connecting", "connected", "linking", "linked", "unlinking", "closing", "closed")

#: Every event a client emits: the official client's, then the three of the automatic relink.
CLIENT_EVENTS = (
    "connecting", "connect", "close", "closing", "accept", "reject", "join", "link", "linking", "unlink",
    "unlinking", "leave", "message", "relinking", "relinked", "relink_failed",
)

#: The statuses in which each call is allowed (the official client's ``canOnly`` checks).
ALLOWED: dict[str, tuple[str, ...]] = {
    "connect": ("initializing", "closed"),
    "link": ("connected",),
    "unlink": ("linked",),
    "leave": ("linked",),
    "send": ("linked",),
    "disconnect": ("connected", "linking", "unlinking"),
    "disconnect(force=True)": ("connected", "linking", "unlinking", "connecting", "linked", "closing"),
}

_ALREADY_LINKED = re.compile(r"user .+ is already linked to a connection")


def is_transient_rejection(reason: str) -> bool:
    """Whether a rejected relink is worth trying again: the server still holds the user's old connection
    (it has not noticed the drop yet), so it answers ``user <name> is already linked to a connection``; or
    its authentication did not answer in time (``authentication timeout``: a token service slow or down for a
    moment, as after a deploy, when every client relinks at once)."""
    return reason == "authentication timeout" or _ALREADY_LINKED.fullmatch(reason) is not None


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """One client event: ``name`` (one of :data:`CLIENT_EVENTS`) and its arguments, as the listeners get them.

    ``match event: case ClientEvent("message", (message,)): ...`` works.
    """

    name: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class RelinkPolicy:
    """When and how often to link again after the connection dropped without the client asking.

    Attempt ``n`` (1-based) waits a random time in ``[0, min(max_delay, base_delay * factor ** (n - 1)))``
    ("full jitter": many clients cut off at once do not come back at once), then connects and links to the
    same user with the same auth, or with what ``auth(username)`` returns (sync or async: a fresh token for each
    attempt; one that raises, or gives no answer within ``link_timeout``, counts as a failed attempt). After
    ``max_attempts`` failed attempts, or when the server rejects the link for a reason other than a transient
    one (``retry_rejected``), the client gives up (``relink_failed``).
    One attempt's link waits at most ``link_timeout`` seconds for the server's answer.
    """

    #: 20 attempts wait about 78 s in all on average, and less than 35 s hardly ever: longer than a server takes
    #: to notice a half-open connection (ours: 15 s between pings, 15 s for the pong, 2 s to close), during which
    #: it answers "already linked" (12 attempts, about 38 s on average, gave up in 1 of 5 such drops).
    max_attempts: int = 20
    base_delay: float = 0.25
    max_delay: float = 10.0
    factor: float = 2.0
    link_timeout: float = 10.0
    #: Rejection reasons that count as a failed attempt instead of ending the relink.
    retry_rejected: Callable[[str], bool] = is_transient_rejection
    #: Where the jitter comes from: a function returning a float in [0, 1).
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)
    #: The auth of each attempt, from the username (``None``: the auth of the link that dropped). Tokens expire.
    auth: Callable[[str], str | None | Awaitable[str | None]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("base_delay and max_delay must not be negative")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")
        if self.link_timeout <= 0:
            raise ValueError("link_timeout must be positive")
        if self.auth is not None and not callable(self.auth):
            raise ValueError(f"auth must be a function of the username (or None), not {self.auth!r}")

    def cap(self, attempt: int) -> float:
        """The longest wait before attempt ``attempt`` (1-based): exponential, bounded by ``max_delay``."""
        if attempt < 1:
            raise ValueError("attempts are counted from 1")
        exponent = min(attempt - 1, 64)  # large enough to reach any max_delay, small enough not to overflow
        return min(self.max_delay, self.base_delay * self.factor**exponent)

    def delay(self, attempt: int) -> float:
        """The wait before attempt ``attempt``: uniform in ``[0, cap(attempt))``."""
        return self.cap(attempt) * self.random()


Emit = Callable[[ClientEvent], None]


class ClientProtocol:
    """One Krmx client's rules: its status, its username, its user list. Drive it from one thread."""

    def __init__(
        self,
        emit: Emit | None = None,
        *,
        version: str = PROTOCOL_VERSION,
        warn: Callable[[str], None] | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self._emit_to = emit
        self.version = version
        self._warn = warn if warn is not None else logging.getLogger("lobby.client").warning
        #: For what is dropped because of the client's own request (an answer that crossed its unlink or its
        #: disconnect): a usual race, not a problem to warn about.
        self._note = note if note is not None else logging.getLogger("lobby.client").debug
        self.status = "initializing"
        #: The user this client links or is linked to (set by :meth:`link`, cleared on reject, own unlink,
        #: disconnect and close).
        self.username: str | None = None
        self._users: dict[str, bool] = {}
        self._auth: str | None = None
        #: ``(username, auth)`` to link to again if the connection drops now without the client asking:
        #: the last user this client linked to, forgotten when it asks to unlink, leave or disconnect, or
        #: when that user leaves (kicked, or the server closed).
        self.relink_target: tuple[str, str | None] | None = None

    # -- state ------------------------------------------------------------------------------------------

    @property
    def users(self) -> list[dict[str, Any]]:
        """``[{"username": ..., "isLinked": ...}]``, in the order the client learned of them."""
        return [{"username": name, "isLinked": linked} for name, linked in self._users.items()]

    def _emit(self, name: str, *args: Any) -> None:
        if self._emit_to is not None:
            self._emit_to(ClientEvent(name, args))

    def _can_only(self, action: str, allowed: str | None = None) -> None:
        if self.status not in ALLOWED[allowed or action]:
            raise ClientError(f"cannot {action} when the client is {self.status}")

    # -- the connection ---------------------------------------------------------------------------------

    def connect(self) -> None:
        """The driver starts opening a connection: ``connecting``."""
        self._can_only("connect")
        self.status = "connecting"
        self._emit("connecting")

    def connected(self) -> None:
        """The connection is open: ``connect``. Ignored unless connecting (a forced disconnect came first)."""
        if self.status != "connecting":
            return
        self.status = "connected"
        self._emit("connect")

    def closed(self) -> None:
        """The connection is gone (or never opened): ``close``, with no user and no user list. Once only."""
        if self.status in ("closed", "initializing"):
            return
        self.status = "closed"
        self.username = None
        self._users = {}
        self._emit("close")

    def disconnect(self, force: bool = False) -> None:
        """The client asks to close: ``closing``. Without ``force`` only when not linked (unlink first)."""
        self._can_only("disconnect", "disconnect(force=True)" if force else "disconnect")
        self.relink_target = None
        if self.status == "closing":
            return  # asked already: one closing event
        self.status = "closing"
        self.username = None
        self._emit("closing")

    # -- calls that send a frame ------------------------------------------------------------------------

    def link(self, username: str, auth: str | None = None) -> bytes:
        """Ask to link to ``username``: ``linking``; return the ``krmx/link`` frame."""
        if not isinstance(username, str):
            raise TypeError(f"username must be a str, not {type(username).__name__}")
        if auth is not None and not isinstance(auth, str):
            raise TypeError(f"auth must be a str or None, not {type(auth).__name__}")
        self._can_only("link")
        self.relink_target = None  # a link of the application's own supersedes the user to come back to
        self.username = username
        self._auth = auth
        self.status = "linking"
        self._emit("linking")
        payload: dict[str, Any] = {"username": username, "version": self.version}
        if auth is not None:
            payload["auth"] = auth
        return orjson.dumps({"type": "krmx/link", "payload": payload})

    def unlink(self) -> bytes:
        """Ask to unlink from the user: ``unlinking``; return the ``krmx/unlink`` frame."""
        self._can_only("unlink")
        self.relink_target = None
        self.status = "unlinking"
        self._emit("unlinking")
        return orjson.dumps({"type": "krmx/unlink"})

    def leave(self) -> bytes:
        """Ask the user to leave: ``unlinking`` (the official client emits the same event); return the
        ``krmx/leave`` frame. The server answers with this user's unlink, then its leave."""
        self._can_only("leave")
        self.relink_target = None
        self.status = "unlinking"
        self._emit("unlinking")
        return orjson.dumps({"type": "krmx/leave"})

    def send(self, message: dict[str, Any]) -> bytes:
        """The frame of an application message (a dict with a string ``type`` not starting with ``krmx/``)."""
        self._can_only("send")
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ClientError(f"a message must be a dict with a string 'type', not {message!r:.100}")
        if message["type"].startswith("krmx/"):
            raise ClientError("cannot send custom messages with type starting with the internal 'krmx/' prefix")
        try:
            data = orjson.dumps(message)
        except TypeError as error:
            raise ClientError(f"message is not JSON-serialisable: {error}") from None
        problem = unsendable(message, data)
        if problem is not None:
            raise ClientError(problem)
        return data

    # -- frames from the server -------------------------------------------------------------------------

    def receive(self, data: str | bytes) -> None:
        """Handle one frame from the server, emitting what the official client emits.

        - ``krmx/rejected``: ``connected``, no username; ``reject(reason)``.
        - ``krmx/accepted``: ``linked``; the user list becomes just this user, linked; ``accept``.
        - ``krmx/joined U``: U is listed (linked only if U is this client's user); ``join(U)``.
        - ``krmx/linked U``: U is marked linked; ``link(U)``.
        - ``krmx/unlinked U``: U is marked unlinked. If U is this client's user the client is ``connected``
          and its user list is *cleared* before ``unlink(U)`` is emitted (listeners still read
          :attr:`username` as U), and the username is cleared after.
        - ``krmx/left U``: U is removed; ``leave(U)``. The server also sends the leaving connection its own
          ``krmx/left`` right after its own ``krmx/unlinked``: by then the client is no longer linked, so it
          reports its own ``leave`` only after its own ``unlink``, with an empty user list, never while linked.
        - Any other message: ``message(message)`` while ``linked``, otherwise dropped with a warning.
        """
        try:
            message = loads(data)
        except orjson.JSONDecodeError:
            self._warn(f"ignored a frame from the server that is not JSON: {data[:100]!r}")
            return
        if type(message) is not dict or type(message.get("type")) is not str:
            self._warn(f"ignored a frame from the server that is not a Krmx message: {data[:100]!r}")
            return
        type_: str = message["type"]
        if not type_.startswith("krmx/"):
            if self.status == "linked":
                self._emit("message", message)
            else:
                report = self._note if self.status in ("unlinking", "closing") else self._warn
                report(f"unexpectedly received a custom message {type_}, while the client is {self.status}")
            return
        payload = message.get("payload")
        if type_ == "krmx/accepted":
            if self.status != "linking":
                report = self._note if self.status == "closing" else self._warn
                report(f"ignored krmx/accepted while the client is {self.status} (no link request is pending)")
                return
            self.status = "linked"
            self._users = {self.username: True} if self.username is not None else {}
            self._emit("accept")
            return
        if type_ == "krmx/rejected":
            reason = payload.get("reason") if type(payload) is dict else None
            if reason == "unlinked connection" and self.status == "linking":
                # The answer to a frame sent before this link (an unlink or a message racing the server's
                # own unlink): a link request is never rejected so. The link's answer is still to come.
                self._warn("ignored a late rejection 'unlinked connection' while linking")
                return
            self.status = "connected"
            self.username = None
            self._users = {}  # the list is held only while linked (a rejection while linked: a stray answer)
            self._emit("reject", reason if isinstance(reason, str) else "rejected")
            return
        name = payload.get("username") if type(payload) is dict else None
        if not isinstance(name, str) or type_ not in ("krmx/joined", "krmx/linked", "krmx/unlinked", "krmx/left"):
            self._warn(f"unexpected krmx message {data[:200]!r}")
            return
        if type_ == "krmx/joined":
            self._users[name] = name == self.username
            self._emit("join", name)
        elif type_ == "krmx/linked":
            if name not in self._users:
                self._warn(f"ignored krmx/linked of {name}, a user this client does not know")
                return
            self._users[name] = True
            if name == self.username and self.status == "linked":
                self.relink_target = (name, self._auth)
            self._emit("link", name)
        elif type_ == "krmx/unlinked":
            if name not in self._users:
                self._warn(f"ignored krmx/unlinked of {name}, a user this client does not know")
                return
            self._users[name] = False
            own = name == self.username
            if own:
                self.status = "connected"
                self._users = {}
            self._emit("unlink", name)
            if own and name == self.username:  # a listener may have started a new link meanwhile
                self.username = None
        else:  # krmx/left
            self._users.pop(name, None)
            if self.relink_target is not None and self.relink_target[0] == name:
                self.relink_target = None  # kicked (or the server closed): there is no user to come back to
            self._emit("leave", name)
