"""A raw websocket peer for server tests: sends frames, reads decoded frames with bounded waits."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

WAIT = 10.0

#: An opening handshake as a peer that writes its own bytes sends it (tests of what websockets' client would
#: not do: frames unmasked, not UTF-8, never reading).
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def raw_linked(port: int, username: str, **options: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP peer that did the handshake and sent its link (the 101 read, nothing more)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **options)
    link = orjson.dumps({"type": "krmx/link", "payload": {"username": username, "version": "0.5.4"}})
    writer.write(UPGRADE + Frame(Opcode.TEXT, link).serialize(mask=True, extensions=[]))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    return reader, writer


class Raw:
    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Raw:
        return cls(await connect(url, max_size=None, **kwargs))

    async def send(self, message: Any) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def next(self) -> Any:
        return orjson.loads(await asyncio.wait_for(self.ws.recv(), WAIT))

    async def expect(self, *messages: Any) -> None:
        for expected in messages:
            assert await self.next() == expected

    async def link(self, username: str, auth: str | None = None, version: str = "0.5.4") -> list[Any]:
        """Link and return the burst up to and including this user's own krmx/linked."""
        payload = {"username": username, "version": version}
        if auth is not None:
            payload["auth"] = auth
        await self.send({"type": "krmx/link", "payload": payload})
        burst = [await self.next()]
        if burst[0]["type"] != "krmx/accepted":
            return burst
        while burst[-1] != {"type": "krmx/linked", "payload": {"username": username}}:
            burst.append(await self.next())
        return burst

    async def echo(self, payload: Any = "ping") -> list[Any]:
        """A barrier: return what the server sent before the echo reply (needs an echo app)."""
        await self.send({"type": "test/echo", "payload": payload})
        before = []
        while (message := await self.next()) != {"type": "test/echoed", "payload": payload}:
            before.append(message)
        return before

    async def closed(self) -> bool:
        try:
            await asyncio.wait_for(self.ws.recv(), WAIT)
        except ConnectionClosed:
            return True
        return False

    async def close(self) -> None:
        await self.ws.close()


def joined(username: str) -> dict[str, Any]:
    return {"type": "krmx/joined", "payload": {"username": username}}


def linked(username: str) -> dict[str, Any]:
    return {"type": "krmx/linked", "payload": {"username": username}}


def unlinked(username: str) -> dict[str, Any]:
    return {"type": "krmx/unlinked", "payload": {"username": username}}


def left(username: str) -> dict[str, Any]:
    return {"type": "krmx/left", "payload": {"username": username}}


def rejected(reason: str) -> dict[str, Any]:
    return {"type": "krmx/rejected", "payload": {"reason": reason}}


ACCEPTED = {"type": "krmx/accepted"}
