"""The error tree of krmx-lobby, under one root.

    LobbyError
    ├── EventLogError        the log file cannot be used: not SQLite, another application's, too new, missing
    ├── InconsistentEvent    an event cannot follow the registry's state (names its seq)
    └── (lobby) ServerError / ClientError, defined in ``lobby.errors``

A client that breaks the protocol never raises: it gets a ``krmx/rejected`` or is unlinked.
"""

from __future__ import annotations

__all__ = ["LobbyError", "EventLogError", "InconsistentEvent"]


class LobbyError(Exception):
    """Root of every error krmx-lobby raises on purpose."""


class EventLogError(LobbyError):
    """The event log cannot be opened or used as asked; the message names the file and what is wrong."""


class InconsistentEvent(LobbyError):
    """An event cannot follow the current registry state."""

    def __init__(self, seq: int | None, message: str) -> None:
        self.seq = seq
        super().__init__(f"seq {seq}: {message}")
