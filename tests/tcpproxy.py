"""A TCP proxy on loopback whose connections a test can cut, to drop a client's connection for real.

The client connects to the proxy, the proxy to the server. :meth:`Proxy.cut` aborts every open pair (both
sockets, no close frame, no FIN handshake: each side sees its connection reset, as in a network failure);
while :attr:`Proxy.refusing` is set, new connections are aborted as soon as they arrive, as if the server
were unreachable; while :attr:`Proxy.silent` is set, nothing gets through, and no one is told. Works in front of any server (ours in-process, or the reference in its own process).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["Proxy"]


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.refusing = False
        #: While set, what either side sends is dropped: a network that went silent (no reset, no FIN).
        self.silent = False
        #: Connections accepted (including refused ones), for tests that count attempts.
        self.accepted = 0
        self.refused = 0
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def open_pairs(self) -> int:
        return len(self._pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.silent:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.transport.abort()

    def cut(self) -> int:
        """Abort every open connection (both ends); return how many were cut."""
        pairs = list(self._pairs)
        for client_side, server_side in pairs:
            client_side.transport.abort()
            server_side.transport.abort()
        return len(pairs)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
