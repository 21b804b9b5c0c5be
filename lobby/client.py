"""An asyncio Krmx client: websockets for I/O, :mod:`lobby.client_protocol` for the rules.

    from lobby import Client, LinkRejected

    client = Client(relink=True)

    @client.on("message")
    def on_message(message):
        print(message)

    await client.connect("ws://127.0.0.1:8082")
    await client.link("alice")               # raises LinkRejected(reason) when the server says no
    await client.send({"type": "chat/say", "payload": "hello"})
    print(client.users)                      # [{"username": "alice", "isLinked": True}]
    await client.leave()
    await client.disconnect()

It behaves like the official JavaScript client ``@krmx/client`` 0.5.4 (same statuses, calls, events and user
list; see :mod:`lobby.client_protocol` for the few deliberate differences), and adds an *automatic relink*
(``Client(relink=RelinkPolicy(...))``): when the connection drops without the client asking, it connects
again with exponential backoff and full jitter and links to the same user, emitting ``relinking(attempt,
delay)`` before each attempt, then ``relinked(username, attempt)``, or ``relink_failed(reason)`` when it gives
up. Events can be consumed by listeners (``client.on(name, fn)``) or by ``async for event in client.events()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast, overload

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidURI
from websockets.frames import CloseCode

from .client_protocol import CLIENT_EVENTS, ClientEvent, ClientProtocol, RelinkPolicy
from .connection import CloseDeadlineDrain
from .errors import ClientError, LinkRejected
from .protocol import SERVER_CLOSED, as_dict

__all__ = ["Client", "EventStream", "RelinkPolicy", "ClientEvent", "CLIENT_EVENTS"]

Listener = Callable[..., Any]
_L = TypeVar("_L", bound=Listener)

_END = object()
#: Seconds ``link()``, ``unlink()`` and ``leave()`` wait for the server's answer by default: more than a
#: server's own limit on an application's authentication (``auth_timeout``, 10 s by default), after which it
#: answers a link itself.
ANSWER_TIMEOUT = 30.0
#: Seconds a closing handshake may take (``connect_options={"close_timeout": ...}`` changes it): a network
#: that went silent counts as dropped twice ``ping_interval`` and this long after its last answer.
CLOSE_TIMEOUT = 2.0
#: Our server's cut-offs for what the client sent (a frame too large closes with code 1009): they end an
#: automatic relink, which would send the same again.
_CUT_OFF_FOR_WHAT_IT_SENT = frozenset({"rate limit", "flood during authentication"})


class EventStream:
    """Every client event from the moment it was created, for ``async for``; see :meth:`Client.events`.

    The iteration ends after the connection closed for good: a ``close`` that no relink follows, or a
    ``relink_failed``. ``aclose()`` (or ``async with``) stops it early.
    """

    def __init__(self, client: Client) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._client = client
        self._done = False
        client._streams.add(self)

    def _put(self, item: Any) -> None:
        if not self._done:
            self._queue.put_nowait(item)
            if item is _END:
                self._done = True
                self._client._streams.discard(self)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ClientEvent:
        if self._done and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        return item  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        while not self._queue.empty():
            self._queue.get_nowait()
        self._put(_END)  # wakes a consumer waiting in __anext__

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Client:
    """A Krmx client. Create it, register listeners, then :meth:`connect` and :meth:`link`.

    ``relink``: ``None``/``False`` (default, like the official client), ``True`` (a default
    :class:`RelinkPolicy`) or a :class:`RelinkPolicy`. ``ping_interval``: seconds between the client's own
    pings (a server that stops answering counts as a dropped connection, within twice ``ping_interval`` and
    :data:`CLOSE_TIMEOUT`; ``None`` disables them; the client always answers the server's pings). ``open_timeout``: seconds to open a connection. ``connect_options``:
    more keyword arguments for :func:`websockets.asyncio.client.connect` (``additional_headers``, ``ssl``,
    ``proxy``, ...).
    """

    def __init__(
        self,
        *,
        relink: RelinkPolicy | bool | None = None,
        ping_interval: float | None = 20.0,
        open_timeout: float = 10.0,
        max_frame_size: int | None = None,
        logger: logging.Logger | None = None,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if relink is True:
            relink = RelinkPolicy()
        self.relink_policy: RelinkPolicy | None = relink or None
        self._log = logger or logging.getLogger("lobby.client")
        self.core = ClientProtocol(self._dispatch, warn=self._log.warning, note=self._log.debug)
        self._ping_interval = ping_interval
        self._open_timeout = open_timeout
        self._max_frame_size = max_frame_size
        self._connect_options = dict(connect_options or {})
        self._listeners: dict[str, list[Listener]] = {}
        self._catch_all: list[Listener] = []
        self._waiters: list[tuple[Callable[[ClientEvent], bool], asyncio.Future[ClientEvent]]] = []
        self._event_waiters: set[asyncio.Future[ClientEvent]] = set()  # those of wait_for
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ws: _Connection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._opening: asyncio.Future[_Connection] | None = None
        self._relink_task: asyncio.Task[None] | None = None
        self._relink_stop = ""
        self.url: str | None = None

    def __repr__(self) -> str:
        return f"<Client {self.status} username={self.username!r} url={self.url!r}>"

    # -- state ------------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """initializing, connecting, connected, linking, linked, unlinking, closing or closed."""
        return self.core.status

    @property
    def username(self) -> str | None:
        """The user this client links or is linked to, else ``None``."""
        return self.core.username

    @property
    def users(self) -> list[dict[str, Any]]:
        """``[{"username": ..., "isLinked": ...}]`` as this client knows them (empty unless linked)."""
        return self.core.users

    @property
    def relinking(self) -> bool:
        """Whether an automatic relink is in progress."""
        return self._relink_task is not None and not self._relink_task.done()

    # -- listeners --------------------------------------------------------------------------------------

    @overload
    def on(self, event: str) -> Callable[[_L], _L]: ...

    @overload
    def on(self, event: str, listener: Listener) -> Callable[[], None]: ...

    def on(self, event: str, listener: Listener | None = None) -> Any:
        """Register ``listener`` for ``event`` (one of :data:`CLIENT_EVENTS`, or ``"*"`` for every event,
        called as ``listener(name, *args)``); without a listener, return a decorator. Registering returns a
        function that unregisters. Listeners run synchronously, in the order the events happen, with the
        client in the state the event left it; an async listener runs as a task. A listener that raises is
        logged and the client carries on."""
        if event != "*" and event not in CLIENT_EVENTS:
            raise ValueError(f"unknown client event {event!r}; expected one of {', '.join(CLIENT_EVENTS)}")

        def register(fn: Listener) -> Callable[[], None]:
            if event == "*":
                self._catch_all.append(fn)
            else:
                self._listeners.setdefault(event, []).append(fn)
            return lambda: self.off(event, fn)

        if listener is None:
            def decorator(fn: Listener) -> Listener:
                register(fn)
                return fn

            return decorator
        return register(listener)

    def off(self, event: str, listener: Listener) -> None:
        """Unregister a listener (nothing happens if it is not registered)."""
        listeners = self._catch_all if event == "*" else self._listeners.get(event, [])
        with contextlib.suppress(ValueError):
            listeners.remove(listener)

    def once(self, event: str, listener: Listener) -> Callable[[], None]:
        """Like :meth:`on`, for the next ``event`` only."""

        def wrapper(*args: Any) -> Any:
            self.off(event, wrapper)
            return listener(*args)

        return self.on(event, wrapper)

    def events(self) -> EventStream:
        """An async iterator of every event from now on (:class:`ClientEvent`), ending when the connection
        closed for good (no relink follows)::

            async for event in client.events():
                if event.name == "message":
                    ...
        """
        stream = EventStream(self)
        if self.status == "closed" and not self.relinking:
            stream._put(_END)  # closed for good already: nothing will come
        return stream

    async def wait_for(
        self, event: str, predicate: Callable[..., bool] | None = None, *, timeout: float | None = None
    ) -> tuple[Any, ...]:
        """Wait for the next ``event`` whose arguments satisfy ``predicate``; return its arguments. Raises
        :class:`TimeoutError` after ``timeout`` seconds, and :class:`ClientError` when the client closes for
        good first (a close that no relink follows, or ``relink_failed``) or is closed for good already
        (except for ``connecting`` and ``connect``, which a later ``connect()`` brings).

        It sees only events after the call: the frames that came with an answer (a message the server sends
        on link, with the link) are handled before the awaiting code goes on. Start waiting first, as a task
        (``asyncio.ensure_future(client.wait_for(...))`` before ``await client.link(...)``), or listen."""
        if event not in CLIENT_EVENTS:
            raise ValueError(f"unknown client event {event!r}; expected one of {', '.join(CLIENT_EVENTS)}")
        if self.status == "closed" and not self.relinking and event not in ("connecting", "connect"):
            raise ClientError(f"cannot wait for {event!r}: the client is closed (connect() first)")
        future = self._expect(lambda e: e.name == event and (predicate is None or bool(predicate(*e.args))))
        self._event_waiters.add(future)
        try:
            return (await asyncio.wait_for(future, timeout)).args
        finally:
            self._event_waiters.discard(future)
            self._forget(future)

    def _dispatch(self, event: ClientEvent) -> None:
        calls = [(fn, (event.name, *event.args)) for fn in self._catch_all]
        calls += [(fn, event.args) for fn in self._listeners.get(event.name, ())]
        for fn, args in calls:
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    self._spawn(result, f"listener {getattr(fn, '__qualname__', fn)!r} of {event.name!r}")
            except Exception:
                self._log.exception("client listener for %r failed", event.name)
        for predicate, future in list(self._waiters):
            if future.done():
                continue
            try:
                matched = predicate(event)
            except Exception as error:  # a wait_for predicate that fails: its waiter gets the error
                if isinstance(error, StopIteration):  # which a future refuses (it would end a coroutine)
                    wrapped = RuntimeError("the wait_for predicate raised StopIteration")
                    wrapped.__cause__ = error
                    error = wrapped
                future.set_exception(error)
                continue
            if matched:
                future.set_result(event)
        for stream in list(self._streams):
            stream._put(event)

    def _end_streams(self) -> None:
        """The client closed for good: event streams end, and waiters for an event that will not come fail."""
        for stream in list(self._streams):
            stream._put(_END)
        for future in self._event_waiters:
            if not future.done():
                future.set_exception(ClientError("the client closed for good before the event came"))

    def _expect(self, predicate: Callable[[ClientEvent], bool]) -> asyncio.Future[ClientEvent]:
        future: asyncio.Future[ClientEvent] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, future))
        return future

    def _forget(self, future: asyncio.Future[ClientEvent]) -> None:
        self._waiters = [(p, f) for p, f in self._waiters if f is not future]

    def _spawn(self, awaitable: Any, what: str) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self._log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    # -- the connection ---------------------------------------------------------------------------------

    async def connect(self, url: str) -> None:
        """Open a connection to the server at ``url`` (``ws://host:port/path``). Raises :class:`ClientError`
        (after a ``close`` event) when it cannot."""
        if self.relinking:
            raise ClientError("cannot connect while an automatic relink is in progress (disconnect() first)")
        await self._connect(url)

    async def _connect(self, url: str) -> None:
        if not isinstance(url, str):
            raise ClientError(f"the server's url is a string like ws://host:port/, not {url!r}")
        self.core.connect()
        self.url = url
        opening: asyncio.Future[_Connection] = asyncio.ensure_future(self._open(url))
        self._opening = opening
        try:
            ws = await opening
        except asyncio.CancelledError:
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                # Opened just as the caller was cancelled: close it, or the server keeps it open.
                self._spawn(opening.result().close(), "closing a connection opened by a cancelled connect()")
            self.core.closed()
            self._end_if_final()
            if opening.cancelled() and self.status == "closed" and not _current_task_cancelling():
                raise ClientError(f"connecting to {url} was cancelled by disconnect()") from None
            raise
        except Exception as error:  # refused, bad handshake, timeout, bad url or connect_options, ...
            self.core.closed()
            self._end_if_final()
            detail = str(error) or type(error).__name__
            raise ClientError(f"error while trying to connect to the server at {url}: {detail}") from error
        finally:
            self._opening = None
        if self.status != "connecting":  # a forced disconnect won the race: it waits for the close
            await ws.close()
            self.core.closed()
            self._end_if_final()
            raise ClientError(f"connecting to {url} was cancelled by disconnect()")
        self._ws = ws
        self.core.connected()
        self._reader = asyncio.create_task(self._read(ws))

    async def _open(self, url: str) -> _Connection:
        try:
            # websockets waits close_timeout (10 s by default) for the closing handshake: of a silent network
            # after a missed pong, and of disconnect(). The server's is 2 s too.
            options = {"close_timeout": CLOSE_TIMEOUT, **self._connect_options}
            ws = cast(_Connection, await ws_connect(
                url,
                ping_interval=self._ping_interval,
                ping_timeout=self._ping_interval,
                open_timeout=self._open_timeout,
                max_size=self._max_frame_size,
                compression=None,
                create_connection=_Connection,
                **options,
            ))
        except InvalidURI as error:
            raise ValueError(str(error)) from error
        if self._ping_interval is not None:
            ws.stall_limit = 2 * self._ping_interval
        return ws

    async def _read(self, ws: _Connection) -> None:
        dropped = True
        try:
            with contextlib.suppress(ConnectionClosed):
                async for data in ws:
                    self.core.receive(data)
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None and rcvd.reason and rcvd.code != 1000 and rcvd.reason != SERVER_CLOSED:
                # A cut-off (rate limit, slow consumer, ...) says why only here: the close event has no reason.
                if rcvd.code == CloseCode.MESSAGE_TOO_BIG or rcvd.reason in _CUT_OFF_FOR_WHAT_IT_SENT:
                    dropped = False  # a relink would send the same again: a loop of cut-offs
                self._log.warning("the server closed the connection: %s (code %s)%s", rcvd.reason, rcvd.code,
                                  "" if dropped or self.relink_policy is None else "; not relinking")
        except asyncio.CancelledError:  # the application is ending (its loop cancels tasks): not a drop
            dropped = False
            ws.transport.abort()
            if self._ws is ws:
                before = set(self._tasks)
                self._on_closed(relink=False)
                # The loop cancels the tasks it knows of and then closes: it would destroy, pending, the tasks
                # of async close listeners started now. They get CLOSE_TIMEOUT to end, as a closing handshake.
                if spawned := self._tasks - before:
                    _, pending = await asyncio.wait(spawned, timeout=CLOSE_TIMEOUT)
                    for task in pending:
                        task.cancel()
                    if pending:
                        await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
            raise
        except Exception:  # never let a reader die silently
            self._log.exception("client reader failed")
            ws.transport.abort()
        finally:
            if self._ws is ws:
                self._on_closed(relink=dropped)

    def _on_closed(self, *, relink: bool = True) -> None:
        self._ws = None
        self._reader = None
        target = self.core.relink_target
        asked = self.status == "closing"
        relink = relink and self.relink_policy is not None and target is not None and not asked
        if relink and not self.relinking:
            # Before the close event, so that its listeners see client.relinking is True.
            self._relink_task = asyncio.ensure_future(self._relink(self.relink_policy, target))  # type: ignore[arg-type]
        self.core.closed()
        if not relink:
            self._end_if_final()

    def _end_if_final(self) -> None:
        if not self.relinking and self.status == "closed":
            self._end_streams()

    async def disconnect(self, force: bool = False) -> None:
        """Close the connection. Without ``force`` only when not linked (``await unlink()`` first); with it,
        in any status but initializing and closed. Stops an automatic relink in progress."""
        if self.relinking:
            assert self._relink_task is not None
            task = self._relink_task
            self._relink_stop = "disconnect() was called"
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            force = True
            if self.status in ("closed", "initializing"):
                self._end_if_final()
                return
        self.core.disconnect(force)
        closed = self._expect(lambda e: e.name == "close")
        try:
            if self._opening is not None:
                self._opening.cancel()
            elif self._ws is not None:
                await self._ws.close()
            else:
                self.core.closed()
            await closed
        finally:
            self._forget(closed)

    def drop(self) -> None:
        """Cut the connection at once, without a close handshake, as a network failure would (for tests and
        demos): the server sees the connection drop and unlinks the user; the client closes, and with
        automatic relink it links again."""
        if self._ws is None:
            raise ClientError(f"cannot drop the connection when the client is {self.status}")
        self._ws.transport.abort()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.relinking or self.status not in ("initializing", "closed"):
            await self.disconnect(force=True)

    # -- linking and messages ---------------------------------------------------------------------------

    async def _write(self, frame: bytes) -> None:
        ws = self._ws
        if ws is None:
            raise ClientError(f"cannot send when the client is {self.status}")
        try:
            await ws.send(frame.decode())
        except ConnectionClosed as error:
            if ws.stalled is None:
                raise ClientError(f"the connection closed: {error}") from None
        if ws.stalled is not None:  # dropped while this send waited (the drop ends its wait without an error)
            raise ClientError(f"the connection dropped: {ws.stalled}")

    async def _request(
        self, frame: bytes, done: Callable[[ClientEvent], bool], what: str, timeout: float | None = None
    ) -> ClientEvent:
        """Send ``frame`` and wait for the first event that ``done`` accepts, or for the close; at most
        ``timeout`` seconds, then raise :class:`ClientError`."""
        outcome = self._expect(lambda e: e.name == "close" or done(e))
        timer = None
        if timeout is not None:
            # A timer on the answer itself, not asyncio.wait_for around the call: no task between the answer
            # and the caller, so the frames read with the answer are handled before the caller goes on.
            error = ClientError(f"no answer to the {what} within {timeout} s (is {self.url} a Krmx server?)")
            def expire() -> None:
                if not outcome.done():
                    outcome.set_exception(error)

            timer = asyncio.get_running_loop().call_later(timeout, expire)
        try:
            await self._write(frame)
            event = await outcome
        finally:
            if timer is not None:
                timer.cancel()
            self._forget(outcome)
        if event.name == "close":
            raise ClientError(f"the connection closed before the {what} completed")
        return event

    async def link(self, username: str, auth: str | None = None, *, timeout: float | None = ANSWER_TIMEOUT) -> None:
        """Link to ``username`` (a new user joins; an unlinked one is taken over), sending ``auth`` if given.
        Returns on this client's own ``link`` event (the other users of the link burst may still be on the
        way); raises :class:`LinkRejected` with the server's reason, or :class:`ClientError` when the client
        is not ``connected``, the connection closes first, or no answer came within ``timeout`` seconds
        (``None``: no limit). A Krmx server always answers; a timeout or cancelling the call leaves the client
        ``linking`` until that answer comes, and ``disconnect(force=True)`` ends any status."""
        if self.relinking:
            raise ClientError("cannot link while an automatic relink is in progress (disconnect() first)")
        _check_timeout(timeout)
        await self._link(username, auth, timeout)

    async def _link(self, username: str, auth: str | None, timeout: float | None) -> None:
        frame = self.core.link(username, auth)
        event = await self._request(
            frame, lambda e: e.name == "reject" or (e.name == "link" and e.args[0] == username), "link", timeout
        )
        if event.name == "reject":
            raise LinkRejected(event.args[0])

    async def unlink(self, *, timeout: float | None = ANSWER_TIMEOUT) -> None:
        """Unlink from the user (it stays in the lobby, unlinked); returns on this client's own ``unlink``,
        after which the user list is empty and the client is ``connected``. Raises :class:`ClientError` as
        :meth:`link` does when no answer came within ``timeout`` seconds."""
        _check_timeout(timeout)
        frame = self.core.unlink()
        own = self.core.username
        await self._request(frame, lambda e: e.name == "unlink" and e.args[0] == own, "unlink", timeout)

    async def leave(self, *, timeout: float | None = ANSWER_TIMEOUT) -> None:
        """Make the user leave the lobby; returns on this client's own ``unlink`` (the server's ``krmx/left``
        for this user follows as a ``leave`` event while the client is ``connected``). Raises
        :class:`ClientError` as :meth:`link` does when no answer came within ``timeout`` seconds."""
        _check_timeout(timeout)
        frame = self.core.leave()
        own = self.core.username
        await self._request(frame, lambda e: e.name == "unlink" and e.args[0] == own, "leave", timeout)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send an application message (a dict with a string ``type``, not ``krmx/...``); only when linked."""
        await self._write(self.core.send(as_dict(message)))

    # -- automatic relink -------------------------------------------------------------------------------

    async def _relink(self, policy: RelinkPolicy, target: tuple[str, str | None]) -> None:
        username, auth = target
        url = self.url
        assert url is not None
        last = "the connection dropped"
        self._relink_stop = ""
        try:
            for attempt in range(1, policy.max_attempts + 1):
                delay = policy.delay(attempt)
                self._dispatch(ClientEvent("relinking", (attempt, delay)))
                await asyncio.sleep(delay)
                try:
                    if policy.auth is not None:
                        fresh = await self._fresh_auth(policy.auth, username, policy.link_timeout)
                        if fresh is not None and not isinstance(fresh, str):  # a bug, not a moment's failure
                            await self._give_up(f"the relink policy's auth function must return a string or None, not {fresh!r}")
                            return
                        auth = fresh
                    if self.status == "closed":
                        await self._connect(url)
                    await self._link(username, auth, policy.link_timeout)
                except LinkRejected as rejection:
                    if not policy.retry_rejected(rejection.reason):
                        await self._give_up(f"link rejected: {rejection.reason}")
                        return
                    last = str(rejection)
                except ClientError as error:
                    last = str(error)
                    await self._reset()
                else:
                    if self.status == "closed":  # it dropped again before this task resumed: try again
                        last = "the connection dropped right after the link"
                        continue
                    self._relink_task = None
                    self._dispatch(ClientEvent("relinked", (username, attempt)))
                    return
            await self._give_up(f"gave up after {policy.max_attempts} attempts: {last}")
        except asyncio.CancelledError:
            self._relink_task = None
            self._dispatch(ClientEvent("relink_failed", (f"cancelled: {self._relink_stop or 'task cancelled'}",)))
            raise

    async def _fresh_auth(self, auth: Callable[[str], Any], username: str, timeout: float) -> object:
        """The relink policy's auth for the next attempt; a failure of it, or no answer within the attempt's
        ``link_timeout``, is a failed attempt (an auth service down for a moment should not end the relink)."""
        limit = asyncio.timeout(timeout)
        try:
            fresh = auth(username)
            if inspect.isawaitable(fresh):
                async with limit:
                    fresh = await fresh
        except Exception as error:
            if isinstance(error, TimeoutError) and limit.expired():  # not a TimeoutError of the function's own
                raise ClientError(f"the relink policy's auth function gave no answer within {timeout} s") from None
            raise ClientError(f"the relink policy's auth function failed: {error!r}") from error
        return fresh

    async def _reset(self) -> None:
        """After a failed attempt, get back to ``connected`` or ``closed`` for the next one."""
        if self.status in ("connected", "closed"):
            return
        ws = self._ws
        if ws is not None:
            reader = self._reader
            ws.transport.abort()
            if reader is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), 5)
        if self.status != "closed":
            self.core.closed()

    async def _give_up(self, reason: str) -> None:
        """No more attempts. Event streams end here (see :class:`EventStream`), even when the last attempt
        left the client connected (a rejected link): what to do next is the application's call."""
        self._log.warning("automatic relink failed: %s", reason)
        self._relink_task = None
        self._dispatch(ClientEvent("relink_failed", (reason,)))
        self._end_streams()


class _Connection(CloseDeadlineDrain, ClientConnection):
    """The client's websockets connection. A server that takes nothing of what waits to be written for
    ``stall_limit`` seconds drops it: once the socket's buffer is full, websockets' keepalive pings wait behind
    the unread frames too, and would never tell (also after the app gave up on a send). A slow link that
    drains, however slowly, is waited for."""

    stall_limit: float | None = None
    #: Why the watch dropped it, if it did.
    stalled: str | None = None
    _stall_watch: asyncio.TimerHandle | None = None
    _stall_mark = 0
    _stall_progress = 0.0

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_limit is not None and self._stall_watch is None:
            self._stall_mark, self._stall_progress = _progress(self.transport), self.loop.time()
            self._stall_watch = self.loop.call_later(self.stall_limit / 4, self._check_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unwatch()
        super().connection_lost(exc)

    def _unwatch(self) -> None:
        if self._stall_watch is not None:
            self._stall_watch.cancel()
            self._stall_watch = None

    def _check_stall(self) -> None:
        assert self.stall_limit is not None
        now = _progress(self.transport)
        if now > self._stall_mark:
            self._stall_progress = self.loop.time()
        self._stall_mark = now
        if self.loop.time() - self._stall_progress >= self.stall_limit:
            self._stall_watch = None
            self.stalled = f"the server read nothing for {self.stall_limit} s"
            self.transport.abort()
            return
        self._stall_watch = self.loop.call_later(self.stall_limit / 4, self._check_stall)


def _progress(transport: Any) -> int:
    """A number that grows as the peer takes what was written: on Linux the bytes its TCP acknowledged
    (TCP_INFO's tcpi_bytes_acked), which counts every buffer on the way, TLS's and the kernel's included;
    elsewhere, or where that cannot be read, what waits in the transport's buffer, negated."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError, ValueError):
            info = transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 128)
            if len(info) >= 128:
                return struct.unpack_from("Q", info, 120)[0]  # type: ignore[no-any-return]
    return -transport.get_write_buffer_size()  # type: ignore[no-any-return]


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
