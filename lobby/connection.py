"""The websocket side of one connection: messages straight from websockets' parser to the lobby server,
frames written as they go on the wire, and why a connection ended."""

from __future__ import annotations

import asyncio
import socket
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.frames import DATA_OPCODES, CloseCode, Opcode
from websockets.protocol import State

if TYPE_CHECKING:
    from .server import Server

__all__ = [
    "HANDSHAKE_SLACK", "CloseDeadlineDrain", "LobbyConnection", "text_frame", "respond", "unlink_reason", "close_quietly",
    "drop_unread",
]

#: Sockets open at most beyond max_connections: upgrades in their handshake, /health and /metrics requests, and
#: websocket upgrades answered 503 while the lobby is full.
HANDSHAKE_SLACK = 64
_TOO_MANY_SOCKETS = (b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: 21\r\n\r\ntoo many connections\n")

_unpack_int = struct.Struct("i").unpack

try:
    import fcntl
    import termios

    def _unacknowledged(fd: int) -> int:
        """Bytes in the socket's send queue: not yet sent, or sent and not acknowledged (Linux's SIOCOUTQ)."""
        return _unpack_int(fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
except (ImportError, AttributeError):  # no fcntl (Windows) or no TIOCOUTQ
    _unacknowledged = None  # type: ignore[assignment]

_pack_len16 = struct.Struct("!BBH").pack
_pack_len64 = struct.Struct("!BBQ").pack


def text_frame(data: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455 section 5.2) holding ``data``."""
    length = len(data)
    if length < 126:
        return bytes((0x81, length)) + data
    if length < 65536:
        return _pack_len16(0x81, 126, length) + data
    return _pack_len64(0x81, 127, length) + data


def respond(connection: ServerConnection, status: HTTPStatus, body: bytes, content_type: str, *, head: bool = False) -> Any:
    response = connection.respond(status, "")
    response.body = b"" if head else body
    del response.headers["Content-Length"], response.headers["Content-Type"]
    response.headers["Content-Length"] = str(len(body))
    response.headers["Content-Type"] = content_type
    return response


class CloseDeadlineDrain:
    """For a websockets connection (server's or client's): its close deadline holds while it waits to write.

    websockets applies its close timeout once the frames queued before the close frame are written: a peer
    that reads nothing (a phone out of signal, with game traffic queued for it; a server gone silent under an
    upload) held a failed or closing connection open until the kernel gave up on the socket, minutes later.
    Past the deadline, the connection is dropped."""

    close_deadline: float | None
    transport: asyncio.Transport

    async def drain(self) -> None:
        if self.close_deadline is None:
            await super().drain()  # type: ignore[misc]
            return
        try:
            async with asyncio.timeout_at(self.close_deadline):
                await super().drain()  # type: ignore[misc]
        except TimeoutError:
            self.transport.abort()


class LobbyConnection(CloseDeadlineDrain, ServerConnection):
    """A websockets connection that hands each whole message straight to the lobby server's inbox.

    websockets would queue messages for a reader task, which wakes once per message; the lobby reads
    every message anyway, in order, so it takes them where they are parsed (fragments joined here;
    websockets already bounds their total size by ``max_size``)."""

    lobby_server: Server
    #: The connection's name in the log (``c1``, ``c2``, ... in a session), set when it opens.
    lobby_label: str | None = None
    lobby_linked = False
    lobby_cut = False
    #: Its links rejected so far (see Server._log_rejection).
    lobby_rejections = 0
    #: An async authentication of its link is running: its frames queue meanwhile, and go on queueing until
    #: the core has handled them all; ``lobby_queued`` bytes of them so far (dropped at the next frame after).
    lobby_authenticating = False
    lobby_queued = 0
    lobby_tokens = 0.0
    lobby_refilled = 0.0
    #: Bytes that came behind the request before it was answered, read once the connection opens.
    _held: bytearray | None = None
    #: The end of what came of the request so far, for a blank line split across two reads.
    _head_tail = b""
    #: Bytes of frames the lobby wrote to the transport, so far (with its buffer, how much the peer took).
    lobby_written = 0
    #: The client's address as a trusted reverse proxy reported it (``X-Forwarded-For``), for the log lines.
    lobby_forwarded_for: str | None = None
    #: Refused at its first byte: more sockets were open than max_connections and HANDSHAKE_SLACK.
    lobby_refused = False
    #: Bytes of its frames waiting for a turn (see Server._frame), and whether that stopped its reading.
    lobby_backlog = 0
    lobby_reading_paused = False
    #: When its reading last resumed (a pong sent before then may have waited behind its frames).
    lobby_resumed_at: float | None = None
    #: When websockets' keepalive last sent a ping (the one a ping timeout is about).
    lobby_pinged_at: float | None = None
    _fragments: list[bytes] | None = None
    _text = True  # the message being received is text (not binary)
    _close_watch: asyncio.TimerHandle | None = None
    #: The link deadline's timer, cancelled once linked or closed.
    lobby_deadline: asyncio.TimerHandle | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    _stall_sent = 0
    _pong_watch: asyncio.TimerHandle | None = None

    async def ping(self, *args: Any, **kwargs: Any) -> Any:
        self.lobby_pinged_at = self.loop.time()
        pong = await super().ping(*args, **kwargs)
        if self.ping_timeout is not None and self.lobby_label is not None and isinstance(pong, asyncio.Future):
            half = self.ping_timeout / 2
            self._pong_watch = self.loop.call_later(half, self._watch_pong, pong, half, None)
        return pong

    # A peer that reads, but slower than the lobby writes to it, answers a ping late: the ping waits behind the
    # frames queued before it (in our buffer and the kernel's). Still taking bytes in the second half of the
    # ping's wait, it is a slow consumer, cut off at once (what it has not read is dropped), not a ping timeout
    # (a peer that takes nothing: gone, or a network that went silent).

    def _watch_pong(self, pong: asyncio.Future[float], half: float, taken_halfway: int | None) -> None:
        self._pong_watch = None
        if self.lobby_cut or (pong.done() and not pong.cancelled()):  # answered (cancelled: the wait timed out)
            return
        taken = self._taken()
        if taken_halfway is None:
            self._pong_watch = self.loop.call_later(half, self._watch_pong, pong, half, taken)
        elif taken > taken_halfway and not _reading_held_since_ping(self):  # else its pong may wait on our side
            self.lobby_server._cut_off(self, self.lobby_label, "slow consumer")

    def _taken(self) -> int:
        """Bytes of the lobby's frames the peer took so far: written, less what waits in our buffer and, where
        the platform tells (Linux), in the kernel's, unacknowledged."""
        taken = self.lobby_written - self.transport.get_write_buffer_size()
        if _unacknowledged is not None:
            try:
                taken -= _unacknowledged(self.transport.get_extra_info("socket").fileno())
            except (OSError, AttributeError):
                pass
        return taken

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except asyncio.CancelledError:
            # websockets' open timeout (handshake_timeout) cancels it, then drops the socket without a word. (A
            # closing server aborts handshakes instead, and cut-offs stop with the lobby.)
            self.lobby_server._cut_off(None, None, "handshake timeout", peer=self)
            raise

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        server = self.lobby_server
        if server.open_sockets >= server.config.max_connections + HANDSHAKE_SLACK:
            # Sockets that never finish their handshake (a slowloris) are held for websockets' open timeout:
            # bounded too, or past the process's file limit honest connections fail, unlogged. The oldest one
            # still sending its request makes room (else a slowloris locked out every newcomer, /health too); with
            # none, this one is answered before its request is read.
            stalled = next((ws for ws in server.handshaking if ws.request is None), None)
            if stalled is None:
                self.lobby_refused = True
                transport.write(_TOO_MANY_SOCKETS)
                transport.close()
                server._cut_off(None, None, "too many connections", peer=self)
                return
            del server.handshaking[stalled]  # counted open until its connection_lost
            stalled.transport.write(_TOO_MANY_SOCKETS)
            stalled.transport.close()
            server._cut_off(None, None, "too many connections", peer=stalled)
        server.open_sockets += 1
        server.handshaking[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lobby_refused:
            self.lobby_server.open_sockets -= 1
        self.lobby_server.handshaking.pop(self, None)
        self.lobby_server._reading_paused.discard(self)
        for timer in (self._stall_timer, self._close_watch, self.lobby_deadline, self._pong_watch):
            if timer is not None:
                timer.cancel()  # it would hold the connection, and its buffers, until it fires
        self._stall_timer = self.lobby_deadline = self._pong_watch = None
        super().connection_lost(exc)
        # websockets leaves reference cycles through its protocol: its parser, suspended in a generator that
        # holds it, and the traceback of the error that ended the parsing (a reset: "unexpected end of stream").
        # Only a full garbage collection would free them with the connection's buffers (and run_event_loop makes
        # those rare): broken here, they are freed now.
        parser = getattr(self.protocol, "parser", None)
        if parser is not None:
            parser.close()
        error = getattr(self.protocol, "parser_exc", None)
        if error is not None:
            error.__traceback__ = None

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is State.CONNECTING:
            if self.protocol.eof_sent:  # the request failed or was answered other than 101: nothing more is read
                self._held = None
                return
            # What comes behind the request waits for its answer: websockets would parse it at once as frames,
            # and on bytes that are none (a second request pipelined behind a /health probe, a body) fail before
            # answering, then fail again answering ("unexpected internal error", at error level, from anyone),
            # and answer nothing. Frames sent right behind an upgrade are read once it is accepted.
            if self.request is None:
                seen = self._head_tail + data
                end = seen.find(b"\r\n\r\n")
                if end < 0:
                    self._head_tail = seen[-3:]
                    self._receive(data)
                    return
                end += 4 - len(self._head_tail)
                self._head_tail = b""
                self._receive(data[:end])
                data = data[end:]
            if data:
                self._hold(data)
            return
        if self._held is not None:  # what came behind the request first, if the handler has not read it yet
            self.lobby_release()
        self._receive(data)

    def lobby_release(self) -> None:
        """Read what came behind the request, now that the connection is open."""
        if self._held is not None:
            held, self._held = bytes(self._held), None
            self._receive(held)

    def _hold(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._held is None:
            self._held = bytearray()
        self._held += data
        if len(self._held) > self.lobby_server.config.max_buffer:  # bounded like unread replies are
            self._held = None
            self.transport.abort()
            self.lobby_server._cut_off(None, None, "flood during handshake", peer=self)

    def _receive(self, data: bytes) -> None:
        super().data_received(data)
        if self.paused and self.lobby_label is not None and not self.lobby_cut:
            # What websockets writes by itself (a pong for every ping) counts against max_buffer too: a peer
            # that floods pings and reads nothing would grow memory without bound.
            if self.transport.get_write_buffer_size() > self.lobby_server.config.max_buffer:
                self.lobby_server._cut_off(self, self.lobby_label, "slow consumer")
        if self.close_deadline is not None and self._close_watch is None:
            # The connection failed (a protocol error, a text frame that is not UTF-8) or is closing: websockets
            # enforces its close timeout only in a send or recv, which the lobby does not await, so a peer that
            # ignores the close frame would stay open (and its user linked) until the next ping, or for ever.
            self._close_watch = self.loop.call_at(self.close_deadline, self._close_overdue)

    def _close_overdue(self) -> None:
        if self.protocol.state is not State.CLOSED:
            self.transport.abort()

    # A peer that stops reading with less than max_buffer unread is cut off too, once its writes have been
    # paused (the socket's buffer full) and it has taken nothing for twice the ping interval: the lobby writes
    # frames to the transport directly, so websockets' keepalive, which waits for the writes to drain before
    # it pings, never fires. One that reads, however slowly, is bounded by max_buffer only.

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.lobby_label is not None and self._stall_timer is None:
            self._watch_stall()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _watch_stall(self) -> None:
        self._stall_sent = self.lobby_written - self.transport.get_write_buffer_size()
        limit = 2 * (self.lobby_server.config.ping_interval or 15.0)
        self._stall_timer = self.loop.call_later(limit, self._stalled)

    def _stalled(self) -> None:
        self._stall_timer = None
        if not self.paused or self.lobby_cut or self.protocol.state is not State.OPEN:
            return
        if self.lobby_written - self.transport.get_write_buffer_size() > self._stall_sent:
            self._watch_stall()  # it took some: slow, not dead
            return
        self.lobby_server._cut_off(self, self.lobby_label, "slow consumer")

    def process_event(self, event: Any) -> None:
        if self.request is None or event.opcode not in DATA_OPCODES:
            super().process_event(event)
            return
        if event.opcode is not Opcode.CONT:
            self._fragments = None
            self._text = event.opcode is Opcode.TEXT
        if event.fin and self._fragments is None:
            data = event.data
        else:
            if self._fragments is None:
                self._fragments = []
            self._fragments.append(event.data)
            if not event.fin:
                return
            data = b"".join(self._fragments)
            self._fragments = None
        if self._text and not data.isascii():
            # A text message must be UTF-8 (RFC 6455 8.1): websockets checks it where it decodes messages,
            # which the lobby skips, so here: the connection fails with 1007, as websockets would fail it.
            try:
                data.decode()
            except UnicodeDecodeError as error:
                self.protocol.fail(CloseCode.INVALID_DATA, f"{error.reason} at position {error.start}")
                self.send_data()
                if self.close_deadline is None:  # websockets sets it before the events: watched once they are done
                    self.close_deadline = self.loop.time() + (self.close_timeout or 10.0)
                return
        self.lobby_server._frame(self, data)


_RESET = struct.pack("ii", 1, 0)


def drop_unread(transport: asyncio.Transport) -> None:
    """Abort, and have the kernel drop what the peer has not taken yet, with a reset: a plain abort closes the
    socket, but the kernel goes on delivering its send buffer (megabytes to a slow consumer) for a minute."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
    transport.abort()


def unlink_reason(ws: LobbyConnection) -> str:
    """Why a connection ended, from the close frame we sent (if we closed it: a close frame sent in answer to
    the peer's is its code echoed, not a limit of ours)."""
    sent = ws.protocol.close_sent
    if ws.protocol.close_rcvd_then_sent:
        return "dropped"
    if sent is not None and sent.code == 1009:
        return "frame too large"
    if sent is not None and sent.code in (1002, 1007):
        # Not the network: a client that breaks the websocket protocol (an unmasked frame, a bad opcode, text
        # that is not UTF-8, a close code of its own making). A client build with a bug shows here.
        return "protocol error"
    if sent is not None and sent.code == 1011 and "ping" in sent.reason:
        # Not read from after the ping was sent (its frames waited beyond INPUT_BACKLOG), its pong waited behind
        # them: it sent more than the lobby could handle, for about a ping timeout.
        return "flood" if _reading_held_since_ping(ws) else "ping timeout"
    return "dropped"


def _reading_held_since_ping(ws: LobbyConnection) -> bool:
    """Whether the lobby stopped reading from ``ws`` after its last ping was sent (or does now): its pong may
    have waited behind its own frames, on our side."""
    resumed, pinged = ws.lobby_resumed_at, ws.lobby_pinged_at
    return ws.lobby_reading_paused or (resumed is not None and (pinged is None or resumed >= pinged))


async def close_quietly(ws: ServerConnection, reason: str) -> None:
    try:
        await asyncio.wait_for(ws.close(1001, reason), 2)
    except Exception:
        ws.transport.abort()
