"""``lobby replay sessions``: the sessions of a log, one line each."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .reader import Log, SessionRange, iso_time, open_log

__all__ = ["SessionSummary", "sessions", "summarize"]


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """One run of a lobby: from its listen to its close, or to the crash (or the present) that ended it."""

    lobby: str
    session: str
    first_seq: int
    last_seq: int
    start: int
    last_at: int
    #: at of the close event; None when the session has no close.
    end: int | None
    #: "closed", "closed for a restart" (users kept), "ended without close" (a crash: a later session of
    #: the lobby exists) or "no close yet" (the last session: still running, or crashed).
    status: str
    users: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return self.end is not None

    @property
    def duration(self) -> int:
        """Microseconds from listen to close (or to the last event, without close)."""
        return (self.end if self.end is not None else self.last_at) - self.start

    @property
    def events(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "lobby": self.lobby,
            "session": self.session,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "start": iso_time(self.start),
            "end": iso_time(self.end) if self.end is not None else None,
            "last_event": iso_time(self.last_at),
            "status": self.status,
            "duration_s": self.duration / 1_000_000,
            "users": self.users,
            "events": self.events,
            "counts": self.counts,
        }


def summarize(log: Log, info: SessionRange) -> SessionSummary:
    users, counts = log.session_counts(info)
    if info.end is not None:
        close = next(iter(log.session_events(info, types=["close"])), None)
        restart = close is not None and getattr(close, "reason", "") == "server restart"
        status = "closed for a restart" if restart else "closed"
    elif log.next_session(info) is not None:
        status = "ended without close"
    else:
        status = "no close yet"
    return SessionSummary(
        lobby=info.lobby, session=info.session, first_seq=info.first_seq, last_seq=info.last_seq,
        start=info.start, last_at=info.last_at, end=info.end, status=status, users=users, counts=counts,
    )


def sessions(path: str | os.PathLike[str], lobby: str | None = None) -> list[SessionSummary]:
    """The sessions of the log at ``path`` (of ``lobby``, if given), in the order they started."""
    with open_log(path) as log:
        if lobby is not None:
            log.lobby(lobby)
        return [summarize(log, info) for info in log.sessions if lobby is None or info.lobby == lobby]
