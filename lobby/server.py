"""The asyncio Krmx server: websockets for I/O, :mod:`lobby.protocol` for the rules, the event log first.

A *turn* handles every input that arrived since the last one (frames of all connections, closed
connections, authentication results), in arrival order:

1. the protocol core turns each input into effects (events to record, frames, closes, auth requests);
2. the events of the turn are appended to the log in **one transaction** (group commit);
3. only then do listeners run, at their place in the effects; whatever the application does from a listener
   (send, broadcast, kick, ...) is recorded in the next transaction of the same turn;
4. when nothing is left to commit, the frames of the turn are written, each connection's in order.

So no frame reaches a client and no listener sees an event before that event is in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import ipaddress
import logging
import os
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar, overload
from urllib.parse import parse_qs

import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidHandshake
from websockets.protocol import State

from events import Event, EventLogError, EventStore, InconsistentEvent, now_us
from events.store import SCHEMA_VERSION

from .config import DEFAULT_MAX_FRAME_SIZE, QueryRule, ServerConfig
from .connection import HANDSHAKE_SLACK, LobbyConnection, close_quietly, drop_unread, respond, text_frame, unlink_reason
from .errors import ServerError
from .health import METRICS_CONTENT_TYPE, VERSION, Metrics
from .logs import configure_logging
from .protocol import (
    as_dict,
    Authenticate,
    CloseConnection,
    CloseNext,
    Drain,
    Effect,
    FinishLeave,
    Record,
    Rejection,
    Resume,
    SendFrame,
    ServerProtocol,
)

try:
    import resource
except ImportError:  # Windows: no file limit to raise
    resource = None  # type: ignore[assignment]

#: The signals that stop a serving server (as close, or keeping users).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

__all__ = ["run_event_loop", "Server", "ServerConfig", "AuthInfo", "QueryRule", "DEFAULT_MAX_FRAME_SIZE", "LISTENER_EVENTS"]


@dataclass(frozen=True, slots=True)
class AuthInfo:
    """What an authenticate listener learns about a link request (the auth string is never logged)."""

    is_new_user: bool
    auth: str | None


Listener = Callable[..., Any]
_L = TypeVar("_L", bound=Listener)
LISTENER_EVENTS = ("listen", "authenticate", "join", "link", "message", "unlink", "leave", "close", "event")
#: Files a server holds besides its sockets: the log, its WAL and shared memory, the lobby's lock, the log
#: file check, stdio, the event loop's own (32); and sockets closing while as many new ones take their place
#: (a stalled handshake making room: up to the 100 a listening socket accepts at once).
FILES_BESIDES_SOCKETS = 32 + 100
#: Bytes of one connection's frames waiting for a turn, at most, before it is no longer read from.
INPUT_BACKLOG = 1024 * 1024
#: Inputs of one connection handled in one turn at most (see Server._take_inputs).
TURN_SHARE = 32
#: Seconds a close waits for async listeners still running (a ``close`` listener saving the game) before
#: it cancels them, with a warning for each.
LISTENER_GRACE = 10.0
#: Seconds a listener cancelled at close has to end (its own clean-up on the way out) before close goes on without it.
LISTENER_CANCEL_GRACE = 2.0
#: Seconds between checks that the log's file is still at its path (see Server._check_log_file).
LOG_FILE_CHECK_INTERVAL = 1.0
#: Refusals (sockets cut off before they opened, upgrades refused) recorded and logged per second at most: anyone
#: can open sockets, and a flood of them would fill the disk with its cut-offs. The rest are counted (see
#: Server._refusal_recorded).
REFUSALS_PER_SECOND = 10
#: ``link rejected`` lines of one connection at info level; the rest are at debug level (all are counted).
REJECTIONS_LOGGED = 10
#: The options the start-up line shows, so that the log tells which limits a session ran with.
_LIMITS = ("max_frame_size", "message_rate", "message_burst", "max_buffer", "link_deadline", "handshake_timeout",
           "max_connections", "max_users", "ping_interval", "auth_timeout", "accept_new_users", "compression",
           "snapshot_every", "origins")


class Server:
    """A Krmx lobby server whose users live in an event log.

    >>> server = Server(db="lobby.db")
    >>> @server.on("message")
    ... def on_message(username, message): ...
    >>> server.run()  # doctest: +SKIP  (or: await server.start(); ...; await server.close())
    """

    def __init__(self, config: ServerConfig | None = None, *, clock: Callable[[], int] = now_us, **options: Any):
        self.config = dataclasses.replace(config or ServerConfig(), **options)
        self._clock = clock
        self._listeners: dict[str, list[Listener]] = {}
        self._status = "initializing"
        self.core: ServerProtocol | None = None
        self.store: EventStore | None = None
        self.session: str | None = None
        self.port: int | None = None
        self._log = structlog.get_logger("lobby")
        #: Inputs waiting for a turn, per connection, in arrival order.
        self._inbox: dict[Hashable, deque[Callable[[], list[Effect]]]] = {}
        self._turn_scheduled = False
        #: While listeners run: the next stage of the current turn, where their server calls go.
        self._next_stage: list[list[Effect]] | None = None
        self._thread: int | None = None
        self._auth_tasks: set[asyncio.Task[None]] = set()
        self._listener_tasks: set[asyncio.Future[Any]] = set()
        #: Connections in their opening handshake (websockets' own set has only open ones).
        self.handshaking: dict[LobbyConnection, None] = {}  # oldest first
        #: Sockets open, in any state (handshaking, open, closing), but those refused at once.
        self.open_sockets = 0
        #: Connections not read from while more than INPUT_BACKLOG bytes of their frames wait for a turn.
        self._reading_paused: set[LobbyConnection] = set()
        #: Frames drained from behind a link in this turn, by connection (at most TURN_SHARE each).
        self._drained: dict[Any, int] = {}
        #: Connections whose next drain waits for the next turn, with their inputs held behind it.
        self._held: dict[Any, list[Callable[[], list[Effect]]]] = {}
        self._ws_server: Any = None
        self._since_snapshot = 0
        #: Seconds the current turn's transactions took so far (the commit metric adds their fsync).
        self._appending = 0.0
        self._connections_opened = 0
        self._refusals_until = 0.0
        self._refusals_recorded = 0
        self._refusals_unrecorded: Counter[str] = Counter()
        self.metrics = Metrics(self)
        self._log_debug = True
        self.fatal: BaseException | None = None
        self._closed = asyncio.Event()
        self._hurry = asyncio.Event()  # set by a second stop signal: close stops waiting for listeners
        self._keep_users_at_close = False

    # -- the application API ----------------------------------------------------------------------------

    def configure(self, **options: Any) -> None:
        """Change options before the server starts (the CLI applies its flags this way)."""
        if self._status != "initializing":
            raise ServerError(f"cannot configure when the server is {self._status}")
        self.config = dataclasses.replace(self.config, **options)

    @overload
    def on(self, event: str) -> Callable[[_L], _L]: ...

    @overload
    def on(self, event: str, listener: _L) -> _L: ...

    def on(self, event: str, listener: Listener | None = None) -> Any:
        """Register ``listener`` for ``event``; without a listener, return a decorator.

        Listeners: ``listen(port)``, ``authenticate(username, info)`` (return ``None`` or ``True`` to accept;
        raise, return ``False`` or return a reason string to reject; may be async, see ``auth_timeout``),
        ``join(username)``, ``link(username)``, ``message(username, message)``, ``unlink(username)``,
        ``leave(username)``, ``close()``, and ``event(event)`` for every committed :class:`events.Event`.
        """
        if event not in LISTENER_EVENTS:
            raise ValueError(f"unknown server event {event!r}; expected one of {', '.join(LISTENER_EVENTS)}")

        def register(fn: Listener) -> Listener:
            if not callable(fn):
                raise ValueError(f"a {event} listener must be a function, not {fn!r}")
            if event == "authenticate" and self._listeners.get("authenticate"):
                raise ServerError("only one authenticate listener can be registered")
            self._listeners.setdefault(event, []).append(fn)
            if self.core is not None:
                self.core.authenticates = bool(self._listeners.get("authenticate"))
            return fn

        return register if listener is None else register(listener)

    @property
    def status(self) -> str:
        """initializing, starting, listening, closing or closed."""
        return self._status

    @property
    def log(self) -> Any:
        """The server's structlog logger, bound to the lobby and, once started, its session: the app's lines
        logged with it are found by ``lobby replay logs -s SESSION`` (and with ``username=``, by ``-u``)."""
        return self._log

    @property
    def users(self) -> list[dict[str, Any]]:
        """``[{"username": ..., "isLinked": ...}]`` in join order."""
        return self.core.users if self.core is not None else []

    def join(self, username: str) -> None:
        self._call(self._require_core().join, username)

    def kick(self, username: str) -> None:
        self._call(self._require_core().kick, username)

    def unlink(self, username: str) -> None:
        self._call(self._require_core().unlink, username)

    def send(self, username: str, message: Mapping[str, Any]) -> None:
        self._call(self._require_core().send, username, as_dict(message))

    def broadcast(self, message: Mapping[str, Any], skip: str | None = None) -> None:
        self._call(self._require_core().broadcast, as_dict(message), skip)

    def _require_core(self) -> ServerProtocol:
        if self.core is None:
            raise ServerError(f"cannot do that when the server is {self._status}")
        return self.core

    # -- starting and stopping --------------------------------------------------------------------------

    async def start(self) -> int:
        """Open the log, rebuild the registry, listen; return the port. Recovers a session that crashed."""
        if self._status != "initializing":
            raise ServerError(f"cannot start listening when the server is {self._status}")
        file_limit, configured = self._raise_file_limit(), self.config.max_connections
        if file_limit is not None:
            # Beyond the limit, accept() fails: the kernel drops the connection (and asyncio's own loop logs each
            # failure with a traceback, thousands a second). Within it, the lobby's 503 answers them.
            fits = file_limit - HANDSHAKE_SLACK - FILES_BESIDES_SOCKETS
            if fits < 1:
                raise ServerError(f"the open files limit, {file_limit}, is too low for a lobby server: it needs at "
                                  f"least {HANDSHAKE_SLACK + FILES_BESIDES_SOCKETS + 1} (ulimit -n, LimitNOFILE=)")
            self.config = dataclasses.replace(self.config, max_connections=fits)
        config = self.config
        self._status = "starting"
        try:
            self.store = EventStore(config.db, durability=config.durability)
            self.store.claim(config.lobby)
            registry = self.store.load_registry(config.lobby)
        except BaseException as error:
            self._status = "initializing"
            if self.store is not None:
                self.store.close()
                self.store = None
            if isinstance(error, InconsistentEvent):
                raise EventLogError(
                    f"{config.db}: lobby {config.lobby!r} does not fold ({error}); "
                    f"`lobby replay verify {config.db}` lists every problem"
                ) from error
            if isinstance(error, sqlite3.DatabaseError):  # a page that does not read: the file is damaged
                raise EventLogError(f"{config.db}: cannot be read: {error}") from error
            raise
        self.core = ServerProtocol(
            registry,
            lobby=config.lobby,
            accept_new_users=config.accept_new_users,
            max_users=config.max_users,
            username_predicate=config.username_predicate,
            versions=config.versions,
            authenticates=bool(self._listeners.get("authenticate")),
        )
        # A lobby's times never go back, even when the system clock steps back (an NTP correction, a VM
        # restored): each input takes the later of the clock and the last time recorded (see _now).
        self.core.now = self.store.last_at(config.lobby) or 0
        self._loop = asyncio.get_running_loop()
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies if p != "*"]
        self._any_proxy = "*" in config.trusted_proxies
        try:
            self._ws_server = await serve(
                self._handle_connection,
                config.host,
                config.port,
                create_connection=self._connection_class(),
                process_request=self._check_request,
                max_size=config.max_frame_size,
                open_timeout=config.handshake_timeout,
                ping_interval=config.ping_interval,
                ping_timeout=config.ping_interval,
                # A peer that stopped answering (missed pong, gone) is not waited for long: its user is
                # unlinked only once its connection is over.
                close_timeout=2,
                compression="deflate" if config.compression else None,
                server_header=None,
                # None stands for no Origin header: not a browser, nothing to protect it from.
                origins=None if config.origins is None else [*config.origins, None],
            )
        except BaseException:  # cannot listen, or cancelled while trying: undo the start, the claim too
            self._status = "initializing"
            self.core = None
            self.store.close()
            self.store = None
            raise
        sockets = list(self._ws_server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else config.port
        self.session = uuid.uuid4().hex[:12]
        self._status = "listening"
        self._thread = threading.get_ident()
        self._log = structlog.get_logger("lobby").bind(lobby=config.lobby, session=self.session)
        self._log_debug = _debug_enabled(self._log)
        if file_limit is not None:
            self._log.warning("open files limit below max_connections", limit=file_limit,
                              max_connections=configured, lowered_to=config.max_connections,
                              hint="raise it (LimitNOFILE= in a systemd unit, ulimit -n) or lower --max-connections")
        for seq, error in self.store.unreadable_snapshots:
            self._log.warning("registry snapshot passed over", seq=seq, error=error)
        if self.store.migrated:
            self._log.info("event log schema", db=str(config.db), applied=self.store.migrated,
                           version=SCHEMA_VERSION)
        recovering = registry.needs_recovery
        crashed, were_linked = registry.session, len(registry.linked())  # before the recovery unlinks them
        self._call(self.core.listen, self.session, self.port)
        # After the listen event is in the log: a start that cannot write (a full disk) never says listening.
        self._log.info(
            "listening", host=config.host, port=self.port, path=config.path, db=str(config.db), users=len(registry.users),
            recovering=recovering, version=VERSION, durability=config.durability,
            limits={name: getattr(config, name) for name in _LIMITS},
        )
        if recovering:  # a warning, for alerts: the server was killed or crashed
            self._log.warning("previous session ended without a close", previous_session=crashed,
                              unlinked=were_linked, hint="its linked users were unlinked (recovered) and may relink")
        self._loop.call_later(LOG_FILE_CHECK_INTERVAL, self._check_log_file)
        return self.port

    def _raise_file_limit(self) -> int | None:
        """Every socket is an open file: a process limit below max_connections (systemd's soft default is 1024)
        would refuse connections in the kernel, before the lobby sees them, and log nothing. Raised up to the
        hard limit, as far as needed; returns the limit if it is still short (said at start)."""
        if resource is None:  # Windows
            return None
        needed = self.config.max_connections + HANDSHAKE_SLACK + FILES_BESIDES_SOCKETS
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return None
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        return soft if soft < needed else None

    def _check_log_file(self) -> None:
        """The log's file must still be at its path: deleted (a "reset" by hand) or replaced under a running
        server, every event from then on would go where no one can read it again, unnoticed."""
        if self.store is None or self.fatal is not None:
            return
        try:
            self.store.check_file()
        except EventLogError as error:
            try:  # moved (not deleted): its last events go into it, not a stray -wal
                folded = self.store.checkpoint()
            except sqlite3.Error as failure:
                folded, error_text = False, str(failure)
            else:
                error_text = "a reader held part of it"
            if not folded:
                self._log.error("event log not folded into the moved file", error=error_text,
                                hint=f"its last events are in {self.store.path}-wal: put the moved log back at "
                                f"{self.store.path} and start a server on it to keep them")
            self._die(error, "event log file gone; stopping")
            return
        self._loop.call_later(LOG_FILE_CHECK_INTERVAL, self._check_log_file)

    async def close(self, *, keep_users: bool = False) -> None:
        """Krmx close: every user kicked, connections closed, ``close`` logged. With ``keep_users`` (a
        deploy), linked users are unlinked with reason ``server restart`` and come back on the next start."""
        if self._status != "listening":
            raise ServerError(f"cannot close when the server is {self._status}")
        self._status = "closing"
        stop = getattr(self, "_stop_event", None)
        if stop is not None:  # serve() returns once this close is done
            stop.set()
        self._keep_users_at_close = keep_users
        try:
            # Async listeners still running end first, while the lobby still runs: what they send reaches
            # their users, and the close listeners (a save of the game) see what they did.
            await self._wait_for_listeners()
        finally:  # also when cancelled meanwhile: the lobby is closed, and the log says so, all the same
            self._close_lobby()
        if self.fatal is not None:
            raise ServerError(f"the server stopped while closing: {self.fatal}")
        await self._ws_server.wait_closed()
        await self._wait_for_listeners()  # the ones the close started: its leave and close listeners
        self._finish()

    def _close_lobby(self) -> None:
        """The Krmx close of :meth:`close`, at once (once): users kicked or unlinked, ``close`` logged, the
        connections closed."""
        core = self.core
        if core is None or core.status != "listening":  # closed already, or stopped by a failure of the log
            return
        for task in self._auth_tasks:
            task.cancel()
        self._call(core.close, keep_users=self._keep_users_at_close)
        self._close_log = self._log.bind(seq=core.registry.seq)  # the close event's: for what its listeners do
        core.closed()
        self._ws_server.close()
        # websockets waits out the handshake timeout of connections still in their opening handshake
        # (one that sent half a request, say): a closing server has nothing to say to them.
        for connection in list(self.handshaking):
            connection.transport.abort()

    async def _wait_for_listeners(self) -> None:
        """Let async listeners finish (the loop would cancel them silently once serve() returns)."""
        tasks = self._listener_tasks - {asyncio.current_task()}  # close() may be called by a listener itself
        if not tasks:
            return
        # Up to LISTENER_GRACE, or until a second stop signal (someone pressing Ctrl-C again); then the rest is
        # cancelled and has LISTENER_CANCEL_GRACE to end (a further stop signal cuts that short too).
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = await self._wait_until(set(tasks), LISTENER_GRACE)
        waited = round(loop.time() - started, 3)
        log = getattr(self, "_close_log", self._log)
        for task in pending:
            log.warning("listener cancelled at close", listener=_task_name(task), waited=waited)
            task.cancel()
        self._hurry.clear()
        for task in await self._wait_until(pending, LISTENER_CANCEL_GRACE):
            # It is left to the loop's shutdown, which cancels it again; the log is closed meanwhile.
            log.error("listener still running after its cancellation: closing without it", listener=_task_name(task))

    async def _wait_until(self, pending: set[asyncio.Future[Any]], timeout: float) -> set[asyncio.Future[Any]]:
        """Wait until ``pending`` are done, ``timeout`` passed or a stop signal hurries the close; return the rest."""
        if not pending:
            return pending
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        hurry = asyncio.ensure_future(self._hurry.wait())
        try:
            while pending and not hurry.done() and loop.time() < deadline:
                done, _ = await asyncio.wait(
                    pending | {hurry}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            hurry.cancel()
        return pending

    def _finish(self) -> None:
        if self._status == "closed":  # finished already: by a failure of the log (_die), or a cancelled serve()
            return
        if self.store is not None:
            try:
                if self.core is not None and self.core.registry.seq is not None:
                    self.store.save_snapshot(self.core.registry)
            except Exception as error:  # a snapshot is derived data: the next start folds the tail instead
                self._log.warning("closing snapshot not written", error=str(error))
            finally:
                self.store.close()  # releases the lobby's claim too
                self.store = None
        self._status = "closed"
        self._log.info("closed")
        self._closed.set()

    async def wait_closed(self) -> None:
        """Return once the server is closed: by :meth:`close`, or by a failure of its event log that stopped
        it (then :attr:`fatal` is that error). For a program that starts the server itself."""
        await self._closed.wait()

    def run(self, *, keep_users_on_stop: bool = False) -> int:
        """Serve until SIGINT, SIGTERM or SIGHUP, then close (the Krmx way, or keeping users); return the process exit
        code. Logs go out as ``lobby serve`` writes them (JSON lines on stderr, ``info``) unless structlog was
        configured already."""
        if not structlog.is_configured():
            configure_logging()
        return run_event_loop(self._serve(keep_users_on_stop, owns_process=True))

    async def serve(self, *, keep_users_on_stop: bool = False) -> int:
        """Start, serve until SIGINT, SIGTERM or SIGHUP, the app's own :meth:`close` or a fatal log error, close;
        return the exit code. Cancelled, it closes the server on the way out. While it serves, its handlers of
        those signals replace the app's; once it returns, the signals have their default actions."""
        return await self._serve(keep_users_on_stop, owns_process=False)

    async def _serve(self, keep_users_on_stop: bool, *, owns_process: bool) -> int:
        """:meth:`serve`; ``owns_process`` (:meth:`run`, ``lobby serve``): after a close that listeners ignoring
        their cancellation outlive, the next stop signal ends the process (the loop's shutdown would wait for
        them for ever)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            if self._status == "closed" and owns_process:
                # Closed, the log too: only listeners that ignore their cancellation keep the process (the
                # loop's shutdown waits for them). A stop signal now is someone who wants it gone.
                self._log.warning("stop signal after close: exiting without the listeners still running",
                                  signal=signum.name)
                os._exit(1 if self.fatal is not None else 0)
            if stop.is_set():  # a second one while closing: stop waiting for async listeners
                self._log.warning("stop signal while closing: not waiting for listeners", signal=signum.name)
                self._hurry.set()
            stop.set()

        # SIGHUP too: the terminal a server was started from closed (it would die without logging close),
        # unless it is ignored (``nohup lobby serve &``: the server is meant to outlive the terminal).
        # A signal ignored when the process started stays ignored: SIGHUP under nohup, and SIGINT for a
        # process a shell script started with `&`. The log line says which ones stop this server.
        handled = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
        for signum in handled:
            loop.add_signal_handler(signum, on_signal, signum)
        self._stop_event = stop
        stuck: list[str] = []
        try:
            await self.start()
            self._log.info("serving until a stop signal", signals=[signum.name for signum in handled],
                           on_stop="keep" if keep_users_on_stop else "close")
            await stop.wait()
            if self.fatal is not None:
                return 1
            if self._status != "listening":  # the app closed the server itself
                await self._closed.wait()
                return 1 if self.fatal is not None else 0
            self._log.info("stopping", keep_users=keep_users_on_stop, signal=received[0] if received else None)
            try:
                await self.close(keep_users=keep_users_on_stop)
            except ServerError:
                if self.fatal is None:
                    raise
            if self.fatal is not None:
                return 1  # the log failed during the close: logged, as any failure of the log while serving
            stuck = [_task_name(task) for task in self._listener_tasks if not task.done()]
            if stuck:
                self._log.error(
                    "listeners still running after close" + (": the process exits once they end, or at the next "
                                                             "stop signal" if owns_process else ""),
                    listeners=stuck,
                )
            return 0
        except asyncio.CancelledError:
            # The app's task was cancelled (a TaskGroup whose other task failed, a timeout): close on the way
            # out, as asyncio's serve_forever does, rather than leave the lobby listening, locked and unclosed.
            if self._status == "listening":
                self._log.info("stopping", keep_users=keep_users_on_stop, cancelled=True)
                await self.close(keep_users=keep_users_on_stop)
            elif self._status == "closing":  # cancelled in the middle of a close: the rest of it, without waiting
                self._close_lobby()
                self._finish()
            raise
        finally:
            if not (stuck and owns_process):
                for signum in handled:
                    loop.remove_signal_handler(signum)

    # -- connections ------------------------------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Any) -> Any:
        """Before the upgrade: health and metrics, the path, the connection limit and the required query
        parameters (otherwise no websocket at all)."""
        if self.config.trusted_proxies and self._is_proxy(connection.remote_address, peer=True):
            connection.lobby_forwarded_for = self._forwarded_for(request)
        # The request target is a path and a query (RFC 9112 3.2.1), not a URL: urlsplit would read one that
        # starts with // as a host ("//[x" raising ValueError, "//x/health" as /health).
        path, _, query = request.path.partition("?")
        if path in ("/health", "/metrics"):
            if request.method not in ("GET", "HEAD"):
                response = connection.respond(HTTPStatus.METHOD_NOT_ALLOWED, "Method Not Allowed\n")
                response.headers["Allow"] = "GET, HEAD"
                return response
            head = request.method == "HEAD"  # the headers a GET would get, no body
            if path == "/health":  # 503 but while listening: a load balancer stops sending players to a closing one
                code = HTTPStatus.OK if self._status == "listening" else HTTPStatus.SERVICE_UNAVAILABLE
                return respond(connection, code, self.metrics.health_json(), "application/json", head=head)
            return respond(connection, HTTPStatus.OK, self.metrics.render(), METRICS_CONTENT_TYPE, head=head)
        if path != self.config.path:
            self.metrics.refused["not found"] += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        if self.config.origins is not None:
            try:
                connection.protocol.process_origin(request.headers)  # websockets' check, answered here to be logged
            except InvalidHandshake:
                return self._refuse(connection, request, "origin not allowed")
        if self._status != "listening":  # closing (its async listeners finishing): no new players
            self.metrics.refused["server closing"] += 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server closing\n")
        if self.open_sockets - len(self.handshaking) >= self.config.max_connections:  # this one is handshaking
            self._cut_off(None, None, "too many connections", peer=connection)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        if self.config.query_params:
            query = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
            for name, rule in self.config.query_params.items():
                value = query.get(name)
                if rule is True:
                    ok = value is not None
                elif rule is False:
                    ok = value is None
                elif isinstance(rule, str):
                    ok = value == rule
                else:
                    try:
                        ok = bool(rule(value))
                    except Exception:
                        ok = False
                if not ok:
                    return self._refuse(connection, request, f"query parameter {name!r} is not valid")
        return None

    def _is_proxy(self, address: Any, *, peer: bool = False) -> bool:
        """Whether ``address`` (the socket's peer, or a hop of X-Forwarded-For) is a trusted proxy: ``*``
        trusts any peer, not the hops it names (the nearest proxy's own is the client's address then)."""
        if peer and self._any_proxy:
            return True
        host = address[0] if isinstance(address, tuple) else address
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a hop that is no address ("unknown", a name, a port on it): a client, not ours
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # a dual-stack socket's peer
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._proxies)

    def _forwarded_for(self, request: Any) -> str | None:
        """The client behind the trusted proxies: X-Forwarded-For's last hop that is not one of them (the hops
        before it were written by whoever the client is, and prove nothing)."""
        hops = [hop.strip() for value in request.headers.get_all("X-Forwarded-For") for hop in value.split(",")]
        hops = [hop for hop in hops if hop]
        for hop in reversed(hops):
            if not self._is_proxy(hop):
                return _shown(hop)
        return _shown(hops[0]) if hops else None

    def _refuse(self, connection: ServerConnection, request: Any, reason: str) -> Any:
        """An upgrade request the configuration does not allow: 403, a count by reason, and a line that says
        who (a wrong ``origins`` or ``query_params`` setting shows here first)."""
        self.metrics.refused[reason] += 1
        if self._refusal_recorded(reason):
            origins = request.headers.get_all("Origin")
            self._log.info("upgrade refused", reason=reason, **_whom(connection),
                           **({"origin": _shown(", ".join(origins))} if origins else {}))
        return connection.respond(HTTPStatus.FORBIDDEN, reason + "\n")

    def _refusal_recorded(self, reason: str) -> bool:
        """Whether to record (and log) this refusal: up to REFUSALS_PER_SECOND a second. The rest are counted in
        the metrics, and each second's in one warning."""
        now = self._loop.time()
        if now >= self._refusals_until:
            self._refusals_until = now + 1.0
            self._refusals_recorded = 0
        if self._refusals_recorded < REFUSALS_PER_SECOND:
            self._refusals_recorded += 1
            return True
        if not self._refusals_unrecorded:
            self._loop.call_at(self._refusals_until, self._report_unrecorded)
        self._refusals_unrecorded[reason] += 1
        return False

    def _report_unrecorded(self) -> None:
        counts, self._refusals_unrecorded = dict(self._refusals_unrecorded), Counter()
        self._log.warning("refusals not recorded", counts=counts, per_second=REFUSALS_PER_SECOND)

    async def _handle_connection(self, ws: LobbyConnection) -> None:
        self._opened(ws)
        await ws.wait_closed()
        if ws.lobby_cut:
            return
        reason = unlink_reason(ws)
        if reason == "dropped":
            self._submit(ws, lambda: self._require_core().disconnect(ws, reason))
        else:  # websockets enforced a limit: a frame too large, a missed pong
            self._cut_off(ws, ws.lobby_label, reason)

    def _opened(self, ws: LobbyConnection) -> None:
        if ws.lobby_label is None:
            self.handshaking.pop(ws, None)
            self._connections_opened += 1
            ws.lobby_label = f"c{self._connections_opened}"
            ws.lobby_tokens = float(self.config.message_burst)
            ws.lobby_refilled = self._loop.time()
            self._submit(ws, lambda: self._require_core().connect(ws))
            # The handshake's headers are not needed any more: a lobby keeps thousands of idle connections.
            ws.request.headers.clear()  # type: ignore[union-attr]
            ws.response.headers.clear()  # type: ignore[union-attr]
            if self.config.link_deadline is not None:
                ws.lobby_deadline = self._loop.call_later(self.config.link_deadline, self._check_linked, ws)
            ws.lobby_release()

    def _check_linked(self, ws: LobbyConnection) -> None:
        ws.lobby_deadline = None
        if ws.lobby_authenticating:  # its link came in time: the app's authentication decides it (auth_timeout)
            ws.lobby_deadline = self._loop.call_later(self.config.auth_timeout, self._check_linked, ws)
            return
        if not ws.lobby_linked and not ws.lobby_cut and ws.protocol.state is State.OPEN:
            self._cut_off(ws, ws.lobby_label, "link deadline")

    def _frame(self, ws: LobbyConnection, data: bytes) -> None:
        """A whole message arrived (called from the connection's data_received, in order)."""
        self._opened(ws)  # frames right behind the handshake can come before the handler starts
        if ws.lobby_cut:
            return
        self.metrics.frames_in += 1
        # Token bucket: message_rate per second on average, message_burst at once.
        now = self._loop.time()
        tokens = min(self.config.message_burst, ws.lobby_tokens + (now - ws.lobby_refilled) * self.config.message_rate)
        ws.lobby_refilled = now
        if tokens < 1:
            self._cut_off(ws, ws.lobby_label, "rate limit")
            return
        ws.lobby_tokens = tokens - 1
        if ws.lobby_queued and not ws.lobby_authenticating and not self._require_core().queued(ws):
            ws.lobby_queued = 0  # nothing waits behind a link any more (however the queue emptied)
        if ws.lobby_authenticating or ws.lobby_queued:
            # Its frames wait in the core until the link is decided: bounded like unread replies are.
            ws.lobby_queued += len(data)
            if ws.lobby_queued > self.config.max_buffer:
                self._cut_off(ws, ws.lobby_label, "flood during authentication")
                return
        action = lambda: self._require_core().receive(ws, data)  # noqa: E731
        if (b"krmx/l" if type(data) is bytes else "krmx/l") in data:  # a link or a leave, most likely (an escaped
            # type, "krmx\/link", is only ordered less strictly)
            action.continues = True  # type: ignore[attr-defined]
        queue = self._submit(ws, action)
        if len(queue) == 1:  # the first since its inputs were last taken
            ws.lobby_backlog = len(data)
        else:
            ws.lobby_backlog += len(data)
            if ws.lobby_backlog > INPUT_BACKLOG and not ws.lobby_reading_paused and not ws.transport.is_closing():
                # The rate limit bounds what arrives, not what waits: a server slower than its clients (a
                # lobby of many users, a slow listener) would hold all they send. TCP makes them wait instead.
                ws.transport.pause_reading()
                ws.lobby_reading_paused = True
                self._reading_paused.add(ws)

    def _cut_off(self, ws: LobbyConnection | None, label: str | None, reason: str, peer: Any = None) -> None:
        """A limit was hit: from now on nothing more is read from ``ws``; the core records the cut-off (and the
        unlink of its user) after the inputs already taken from it, and the connection is closed. It is written
        what those inputs bring until then (a slow consumer: nothing, its connection is aborted at once)."""
        if ws is not None and ws.lobby_cut:  # cut off already (its abort's connection_lost still to come)
            return
        if self.core is None or self.core.status != "listening":  # closed: every user is unlinked already
            if ws is not None:
                ws.lobby_cut = True
            return
        self.metrics.cutoffs[reason] += 1
        if ws is None and not self._refusal_recorded(reason):  # a socket that never opened: no user, no state
            return
        username = self.core.username_of(ws) if ws is not None and self.core is not None else None
        self._log.warning("cut off", reason=reason, **_whom(ws or peer, label), **({"username": username} if username else {}))
        if ws is not None:
            ws.lobby_cut = True
            if reason == "slow consumer":
                drop_unread(ws.transport)  # what it has not read yet is dropped, not written
        self._submit(ws, lambda: self._require_core().cut_off(ws, label, reason))

    def _connection_class(self) -> type[LobbyConnection]:
        server = self

        class Connection(LobbyConnection):
            lobby_server = server

        return Connection

    # -- turns ------------------------------------------------------------------------------------------

    def _submit(self, connection: Hashable, action: Callable[[], list[Effect]]) -> deque[Callable[[], list[Effect]]]:
        queue = self._inbox.get(connection)
        if queue is None:
            self._inbox[connection] = queue = deque()
        queue.append(action)
        if not self._turn_scheduled:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)
        return queue

    def _take_inputs(self) -> list[list[tuple[Hashable, Callable[[], list[Effect]]]]]:
        """This turn's inputs in rounds: round k holds the k-th queued input of every connection that has
        one, so that a connection's next frame meets the state its previous frame's listeners left (frames
        are handled strictly in order, as one at a time would be), while inputs of different connections
        share a commit. At most TURN_SHARE rounds: one connection that sent a thousand frames at once delays
        the others by a share, not by all of them; the rest waits for the next turn, after the loop has
        read the sockets again."""
        first: list[tuple[Hashable, Callable[[], list[Effect]]]] = []
        rounds = [first]
        inbox = self._inbox
        for connection, queue in list(inbox.items()):
            if len(queue) == 1:  # the usual case: one frame since the last turn
                first.append((connection, queue[0]))
                del inbox[connection]
                continue
            for index in range(min(len(queue), TURN_SHARE)):
                if index == len(rounds):
                    rounds.append([])
                rounds[index].append((connection, queue.popleft()))
            if not queue:
                del inbox[connection]
        if inbox:
            self._turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)
        if self._reading_paused:
            for ws in [ws for ws in self._reading_paused if ws not in inbox]:  # all its frames taken: read on
                self._reading_paused.discard(ws)
                if not ws.transport.is_closing():  # (closed while paused: unlink_reason reads the flag)
                    ws.lobby_reading_paused = False
                    ws.lobby_resumed_at = self._loop.time()
                    ws.transport.resume_reading()
        return rounds

    def _turn(self) -> None:
        self._turn_scheduled = False
        rounds = self._take_inputs()
        if self.core is None or self.fatal is not None:
            return
        self._now(self.core)
        self._drained.clear()
        held = self._held
        out: list[SendFrame | CloseConnection] = []
        try:
            for actions in rounds:
                stage = []
                for connection, action in actions:
                    if connection in held:  # its drain waits for the next turn: so do its later inputs
                        held[connection].append(action)
                    else:
                        if stage and getattr(action, "continues", False):
                            # An input that may go on in later stages (a link, a leave): the inputs before it
                            # end first, their listeners' calls included, so that none of theirs comes between
                            # its own messages (the log's order is always the order the calls were made in).
                            self._stages(stage, out)
                            stage = []
                        effects = action()
                        if not effects:
                            continue
                        stage.append(effects)
                        if not _CONTINUATIONS.isdisjoint(map(type, effects)):
                            # It goes on in later stages (a leave's second step, a new user's link, an
                            # authentication, ...): it ends before the next input is handled, so that no other
                            # frame's messages come between its own, and the next input meets the state it left.
                            self._stages(stage, out)
                            stage = []
                if stage:
                    self._stages(stage, out)
            self._send(out)
        except ServerError:
            if self.fatal is None:
                raise
            # Logged by _die; the server is down and serve() returns 1.
        finally:
            self._requeue_held()

    def _requeue_held(self) -> None:
        """Put the held inputs back first in their connections' inboxes, in order, for the next turn."""
        for connection, actions in self._held.items():
            queue = self._inbox.get(connection)
            self._inbox[connection] = deque(actions) if queue is None else deque([*actions, *queue])
        if self._held:
            self._held.clear()
            if not self._turn_scheduled:
                self._turn_scheduled = True
                asyncio.get_running_loop().call_soon(self._turn)

    def _now(self, core: ServerProtocol) -> None:
        """The time of this turn's events: the clock's, unless it went back (then the last one recorded), so
        that time queries over the log, which search it by time, stay right."""
        now = self._clock()
        if now > core.now:
            core.now = now

    def _call(self, method: Callable[..., list[Effect]], *args: Any, **kwargs: Any) -> None:
        """A server-side call: from inside a listener, it joins the current turn at the listener's place;
        from anywhere else, it is a turn of its own, committed and written before the call returns."""
        core = self._require_core()
        if self._thread is not None and threading.get_ident() != self._thread:
            raise ServerError(
                "call the server from its event loop's thread (from another thread: loop.call_soon_threadsafe)"
            )
        if self._next_stage is not None:
            self._next_stage.append(method(*args, **kwargs))
            return
        self._now(core)
        self._drained.clear()
        out: list[SendFrame | CloseConnection] = []
        try:
            self._stages([method(*args, **kwargs)], out)
            self._send(out)
        finally:
            self._requeue_held()

    def _stages(self, stage: list[list[Effect]], out: list[SendFrame | CloseConnection]) -> None:
        """Commit stage by stage (a stage's listeners run after its commit; what they do is the next stage),
        collecting the frames in ``out`` in the order they were made: the order of the seqs, stage by stage,
        and within a stage in the order of its events."""
        while stage:
            committed = iter(self._commit([e.event for effects in stage for e in effects if type(e) is Record]))
            next_stage: list[list[Effect]] = []
            for effects in stage:
                for effect in effects:
                    kind = type(effect)
                    if kind is SendFrame or kind is CloseConnection:
                        out.append(effect)  # type: ignore[arg-type]
                    elif kind is Record:
                        self._emit(next(committed), next_stage, effect.detail)  # type: ignore[attr-defined]
                    elif kind is Rejection:
                        out.append(effect)  # type: ignore[arg-type]
                        self._log_rejection(effect)  # type: ignore[arg-type]
                    elif kind is Resume:
                        next_stage.append(self._require_core().resume(effect.connection, effect.ticket))  # type: ignore[attr-defined]
                    elif kind is Drain:
                        self._drain(effect.connection, next_stage)  # type: ignore[attr-defined]
                    elif kind is FinishLeave:
                        next_stage.append(self._require_core().finish_leave(effect.username))  # type: ignore[attr-defined]
                    elif kind is CloseNext:
                        next_stage.append(self._require_core().close_next())
                    else:
                        self._authenticate(effect, next_stage)  # type: ignore[arg-type]
            stage = next_stage

    def _log_rejection(self, rejection: Rejection) -> None:
        """A ``link rejected`` line, for the first REJECTIONS_LOGGED of a connection; the rest at debug level (a
        client looping on a bad link, or a hostile one, wrote a line per frame: a gigabyte an hour)."""
        connection: Any = rejection.connection
        connection.lobby_rejections += 1
        count = connection.lobby_rejections
        if count > REJECTIONS_LOGGED and not self._log_debug:
            return
        line = {"reason": rejection.reason, "username": _shown(rejection.username), **_whom(connection)}
        if count > REJECTIONS_LOGGED:
            self._log.debug("link rejected", **line)
        else:
            self._log.info("link rejected", **line, **({"further": "at debug level"} if count == REJECTIONS_LOGGED else {}))

    def _drain(self, connection: Any, next_stage: list[list[Effect]]) -> None:
        """Handle the next frame that waited behind a link, in the next stage; past TURN_SHARE of them in one
        turn, the rest waits for the next turn, first of the connection's inputs (as an inbox share does)."""
        if self._drained.get(connection, 0) < TURN_SHARE:
            next_stage.append(self._drain_one(connection))
            return
        # Its later inputs of this turn (a disconnect among them) are held behind it: see _turn.
        self._held[connection] = [lambda: self._drain_one(connection)]

    def _drain_one(self, connection: Any) -> list[Effect]:
        self._drained[connection] = self._drained.get(connection, 0) + 1
        return self._require_core().drain(connection)

    def _send(self, out: list[SendFrame | CloseConnection]) -> None:
        """End a turn: one fsync for all of its commits, then its frames."""
        if self.store is not None:
            started = time.perf_counter()
            try:
                self.store.sync()  # one fsync per turn: every event of the turn is durable before a frame leaves
            except OSError as error:
                self._die(error)
                raise ServerError(f"the event log could not be synced: {error}") from error
            if self._appending:  # the turn's commit latency: its transactions and their fsync
                self.metrics.commit_seconds.observe(self._appending + time.perf_counter() - started)
                self._appending = 0.0
        self._flush(out)

    def _commit(self, events: list[Event]) -> list[Event]:
        if not events:
            return []
        assert self.store is not None and self.core is not None
        try:
            started = time.perf_counter()
            seqs = self.store.append(events, sync=False)  # synced once per turn, before its frames
            self._appending += time.perf_counter() - started
            self.metrics.events_appended += len(seqs)
        except Exception as error:
            self._die(error)
            raise ServerError(f"the event log could not be written: {error}") from error
        registry = self.core.registry
        registry.seq = seqs[-1]
        self._since_snapshot += len(seqs)
        if self._since_snapshot >= self.config.snapshot_every:
            self._since_snapshot = 0
            try:
                self.store.save_snapshot(registry)
            except Exception as error:  # derived data: the next start folds a longer tail instead
                self._log.warning("snapshot not written", error=str(error), seq=registry.seq)
        # Stamp the seqs in place: these events are not published yet (no listener or log line has seen
        # them), and a copy of each would cost more than the rest of the turn's bookkeeping.
        for event, seq in zip(events, seqs):
            _stamp(event, "seq", seq)
        return events

    def _die(self, error: BaseException, what: str = "event log append failed; stopping without sending this turn") -> None:
        """The log cannot be written: nothing of this turn may be seen, and serving on would lose events."""
        self.fatal = error
        self._log.critical(what, error=str(error))
        for connection in list(getattr(self._ws_server, "connections", ())):
            connection.transport.abort()
        if self._ws_server is not None:
            self._ws_server.close()
        if self.store is not None:
            self.store.close()
            self.store = None
        self.core = None
        self._status = "closed"
        self._closed.set()
        stop = getattr(self, "_stop_event", None)
        if stop is not None:
            stop.set()

    def _emit(self, event: Event, next_stage: list[list[Effect]], detail: str | None = None) -> None:
        username = getattr(event, "username", None)
        linked_by = None
        if event.type == "link":
            connection = linked_by = self.core.connection_of(username) if self.core is not None else None
            if connection is not None:
                connection.lobby_linked = True  # type: ignore[attr-defined]
                if connection.lobby_deadline is not None:  # type: ignore[attr-defined]
                    connection.lobby_deadline.cancel()  # type: ignore[attr-defined]
                    connection.lobby_deadline = None  # type: ignore[attr-defined]
        custom = event.type in ("message", "send", "broadcast")
        listeners = self._listeners.get(event.type, ())
        catch_all = self._listeners.get("event", ())
        if custom and not listeners and not catch_all and not self._log_debug:
            return  # the hot path: a custom message nobody listens to and nobody logs
        if custom:
            if self._log_debug:
                self._event_log(event).debug(event.type)
        else:
            reason = getattr(event, "reason", None)
            if event.type == "cutoff":  # which connection: its "cut off" warning names it too
                self._event_log(event).info(event.type, reason=reason, connection=event.connection)  # type: ignore[attr-defined]
            elif linked_by is not None:  # which connection and address: a later cut-off names the connection only
                self._event_log(event).info(event.type, **_whom(linked_by))
            elif detail is not None:  # an unlink for what the client sent: what it was
                self._event_log(event).info(event.type, reason=reason, frame=detail)
            else:
                self._event_log(event).info(event.type, **({"reason": reason} if reason else {}))
        if not listeners and not catch_all:
            return
        args: tuple[Any, ...]
        if event.type == "listen":
            args = (event.port,)  # type: ignore[attr-defined]
        elif event.type == "close":
            args = ()
        elif event.type == "message":
            args = (username, event.message)  # type: ignore[attr-defined]
        elif event.type in ("send", "broadcast"):
            listeners = ()
            args = ()
        else:
            args = (username,)
        saved, self._next_stage = self._next_stage, next_stage
        try:
            for listener in listeners:
                self._invoke(listener, *args, event=event)
            for listener in catch_all:
                self._invoke(listener, event, event=event)
        finally:
            self._next_stage = saved

    def _event_log(self, event: Event) -> Any:
        username = getattr(event, "username", None)
        return self._log.bind(seq=event.seq, username=username) if username else self._log.bind(seq=event.seq)

    def _invoke(self, listener: Listener, *args: Any, event: Event) -> None:
        try:
            result = listener(*args)
            if result is not None and inspect.isawaitable(result):  # most listeners return None: skip the check
                task = asyncio.ensure_future(result)
                if isinstance(task, asyncio.Task):
                    task.set_name(f"{event.type} listener {getattr(listener, '__qualname__', repr(listener))}")
                self._listener_tasks.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(self._listener_tasks.discard)
                task.add_done_callback(lambda t: self._report_task(t, listener, self._event_log(event)))
        except Exception:
            self._event_log(event).exception(
                "listener failed", listener=getattr(listener, "__qualname__", repr(listener))
            )

    def _report_task(self, task: asyncio.Future[Any], listener: Listener, log: Any) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "listener failed", listener=getattr(listener, "__qualname__", repr(listener)),
                exc_info=task.exception(),
            )

    def _authenticate(self, request: Authenticate, next_stage: list[list[Effect]]) -> None:
        core = self._require_core()
        listener = self._listeners["authenticate"][0]
        info = AuthInfo(is_new_user=request.is_new_user, auth=request.auth)
        log = self._log.bind(username=request.username)
        saved, self._next_stage = self._next_stage, next_stage  # its server calls join this turn
        try:
            result = listener(request.username, info)
        except Exception as error:
            reason: str | None = _raised(error, log)
        else:
            if inspect.isawaitable(result):
                request.connection.lobby_authenticating = True  # type: ignore[attr-defined]
                task = asyncio.ensure_future(self._authenticate_later(request, result, log))
                self._auth_tasks.add(task)
                task.add_done_callback(self._auth_tasks.discard)
                return
            reason = _verdict(result, log)
        finally:
            self._next_stage = saved
        next_stage.append(core.authenticated(request.connection, request.ticket, reason))

    async def _authenticate_later(self, request: Authenticate, pending: Awaitable[Any], log: Any) -> None:
        reason: str | None = None
        try:
            reason = _verdict(await asyncio.wait_for(pending, self.config.auth_timeout), log)
        except asyncio.TimeoutError:
            reason = "authentication timeout"
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = _raised(error, log)
        request.connection.lobby_authenticating = False  # type: ignore[attr-defined]
        action = lambda: self._require_core().authenticated(request.connection, request.ticket, reason)  # noqa: E731
        action.continues = True  # type: ignore[attr-defined]  # the link it decides
        self._submit(request.connection, action)

    def _flush(self, out: list[SendFrame | CloseConnection]) -> None:
        """Write the turn's frames, each connection's in order, with one socket write per connection."""
        frames: dict[Hashable, list[bytes]] = {}
        closes: list[CloseConnection] = []
        for item in out:
            if type(item) is CloseConnection:
                closes.append(item)
            else:  # a SendFrame, or a Rejection (a SendFrame too)
                queue = frames.get(item.connection)
                if queue is None:
                    frames[item.connection] = [item.data]
                else:
                    queue.append(item.data)
        # A broadcast hands the same bytes to every recipient: frame them once. Server frames are unmasked
        # text frames; without extensions (compression off) their wire form depends on the payload only,
        # so they are built here and written directly, after anything websockets itself has queued.
        framed: dict[int, bytes] = {}
        direct = not self.config.compression
        max_buffer = self.config.max_buffer
        for ws, datas in frames.items():
            protocol = ws.protocol  # type: ignore[attr-defined]
            # A connection cut off is still written what its inputs before the cut-off brought (the frames
            # within its limits), as the log says, up to its close; one cut off as a slow consumer is aborted.
            if protocol.state is not State.OPEN or (ws.lobby_cut and ws.transport.is_closing()):  # type: ignore[attr-defined]
                continue
            try:
                if direct:
                    parts = protocol.data_to_send()  # normally empty: pings and pongs are written at once
                    for data in datas:
                        wire = framed.get(id(data))
                        if wire is None:
                            wire = framed[id(data)] = text_frame(data)
                        parts.append(wire)
                else:
                    for data in datas:
                        protocol.send_text(data)
                    parts = protocol.data_to_send()
                self.metrics.frames_out += len(datas)
                transport = ws.transport  # type: ignore[attr-defined]
                payload = b"".join(parts) if len(parts) > 1 else parts[0]
                transport.write(payload)  # one write for a whole burst
                ws.lobby_written += len(payload)  # type: ignore[attr-defined]
                if transport.get_write_buffer_size() > max_buffer:
                    if ws.lobby_cut:  # cut off already, for what it sent: bounded all the same
                        drop_unread(transport)
                    else:
                        self._cut_off(ws, ws.lobby_label, "slow consumer")  # type: ignore[arg-type]
            except Exception as error:  # the peer went away mid-write: its close unlinks it
                self._log.debug("write failed", error=str(error))
        for close in closes:
            ws = close.connection
            asyncio.ensure_future(close_quietly(ws, close.reason))  # type: ignore[arg-type]


_stamp = object.__setattr__
#: Effects that continue an input in a later stage of its turn.
_CONTINUATIONS = frozenset({Authenticate, Resume, Drain, FinishLeave, CloseNext})
def run_event_loop(main: Any) -> Any:
    """Run ``main`` on uvloop where it is installed (Linux, macOS: its C transports cut the per-frame cost
    of reading and writing sockets), else on asyncio's own loop.

    This is a server process's entry point, so it also tunes the garbage collector for one: what was
    loaded so far is frozen out of collections, and the young generation is collected every 50,000
    allocations instead of 700, since a turn allocates many short-lived objects and frequent collections
    showed as latency spikes (echo p99 about 25% lower). Collections are rarer, so what the server holds
    must not wait for one: a closed connection is freed at once (see LobbyConnection.connection_lost)."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 10)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _task_name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def _debug_enabled(log: Any) -> bool:
    """Whether debug lines are kept (so that per-message lines cost nothing when they are not)."""
    is_enabled_for = getattr(log, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


def _verdict(result: Any, log: Any) -> str | None:
    """What an authenticate listener's return value says: ``None`` or ``True`` accepts; ``False`` or a
    string (the reason) rejects. Anything else is a mistake that must not let a user in: rejected, logged."""
    if result is None or result is True:
        return None
    if result is False:
        return "authentication failed"
    if isinstance(result, str) and result:
        return result
    log.error(
        "authenticate returned neither None/True (accept) nor False/a reason (reject): rejected",
        returned=repr(result)[:200],
    )
    return "authentication failed"


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _raised(error: BaseException, log: Any) -> str:
    """An authenticate listener raised: its message is the reason (KRMX.md, rule 8). A PermissionError of the
    app's own (no errno) is the way to reject; anything else may be a bug (``1/0``, a key file that cannot be
    read), so the log gets it with its traceback."""
    if not (isinstance(error, PermissionError) and error.errno is None):
        log.warning(
            "authenticate raised: link rejected with its message (raise PermissionError to reject on purpose)",
            exc_info=error,
        )
    return _reason(error)


def _shown(username: str | None) -> str | None:
    """A username as a log line shows it: a rejected one can be anything up to a frame's size."""
    return username if username is None or len(username) <= 64 else username[:64] + "..."


def _whom(ws: Any, label: str | None = None) -> dict[str, Any]:
    """Which connection a log line is about: its name in the log and the peer's address."""
    if ws is None:
        return {"connection": label}
    peer = ws.remote_address
    remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None
    line = {"connection": label or ws.lobby_label, "remote": remote}
    if ws.lobby_forwarded_for is not None:  # behind a trusted proxy: the client's address, and the proxy's
        line.update(remote=ws.lobby_forwarded_for, proxy=remote)
    return line
