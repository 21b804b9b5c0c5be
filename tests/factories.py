"""Small helpers to write events in tests without repeating lobby, session and time."""

from __future__ import annotations

from events import Broadcast, Close, EventStore, Join, Leave, Link, Listen, Message, Send, Unlink


class Events:
    def __init__(self, lobby: str = "main", session: str = "s1", at: int = 1_700_000_000_000_000) -> None:
        self.lobby, self.session, self.at = lobby, session, at

    def _common(self) -> dict:
        self.at += 1
        return {"lobby": self.lobby, "session": self.session, "at": self.at}

    def listen(self, port=8082):
        return Listen(**self._common(), port=port)

    def join(self, username):
        return Join(**self._common(), username=username)

    def link(self, username, auth=False):
        return Link(**self._common(), username=username, auth=auth)

    def message(self, username, message):
        return Message(**self._common(), username=username, message=message)

    def send(self, username, message):
        return Send(**self._common(), username=username, message=message)

    def broadcast(self, message, skip=None):
        return Broadcast(**self._common(), message=message, skip=skip)

    def unlink(self, username, reason="requested"):
        return Unlink(**self._common(), username=username, reason=reason)

    def leave(self, username, reason="requested"):
        return Leave(**self._common(), username=username, reason=reason)

    def close(self, reason="close"):
        return Close(**self._common(), reason=reason)


def garbled_log(path):
    """A log of about 2,000 events whose 21st page is overwritten with 0xff (a disk error in its middle)."""
    ev = Events()
    with EventStore(path) as store:
        store.append([ev.listen(), *(ev.message("bob", {"type": "a/b", "payload": "x" * 200}) for _ in range(2000)),
                      ev.close()])
    page = 4096
    assert path.stat().st_size > 40 * page
    with open(path, "r+b") as log:
        log.seek(20 * page)
        log.write(b"\xff" * page)
    return path
