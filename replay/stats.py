"""``lobby replay stats``: summaries per session and per user.

Per user: time linked, links, drops (unlinks the user did not ask for, that were no leave and no deploy:
every reason but ``requested``, ``kick``, ``close`` and ``server restart``) by reason, the time from a drop to the next link of that user
(``relink``), drops never followed by a link in the session, and custom messages sent per type. Per
session: the same, summed, plus the server's own messages (send and broadcast) per type.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from events import Event, apply

from .index import registry_at
from .reader import Log, open_log, progress
from .sessions import SessionSummary, summarize

__all__ = ["UserStats", "SessionStats", "StatsReport", "stats", "NOT_DROPS"]

#: Unlink reasons that are not drops: the user asked, was removed with a leave, or the server stopped for a
#: deploy keeping its users (a crash shows as ``recovered``, which is a drop).
NOT_DROPS = frozenset({"requested", "kick", "close", "server restart"})


def _message_type(event: Event) -> str:
    message = getattr(event, "message", None)
    return message["type"] if isinstance(message, dict) and isinstance(message.get("type"), str) else "?"


def _timing(values: list[int]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "median_s": None, "mean_s": None, "max_s": None}
    return {
        "count": len(values),
        "median_s": statistics.median(values) / 1_000_000,
        "mean_s": statistics.fmean(values) / 1_000_000,
        "max_s": max(values) / 1_000_000,
    }


@dataclass
class UserStats:
    username: str
    linked_us: int = 0
    links: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    unlinks: Counter[str] = field(default_factory=Counter)
    relinks_us: list[int] = field(default_factory=list)
    never_relinked: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    left: str | None = None

    def merge(self, other: UserStats) -> None:
        self.linked_us += other.linked_us
        self.links += other.links
        self.drops.update(other.drops)
        self.unlinks.update(other.unlinks)
        self.relinks_us += other.relinks_us
        self.never_relinked += other.never_relinked
        self.messages.update(other.messages)
        self.left = other.left

    def to_dict(self) -> dict[str, Any]:
        return {
            "username": self.username,
            "linked_s": self.linked_us / 1_000_000,
            "links": self.links,
            "drops": sum(self.drops.values()),
            "drop_reasons": dict(self.drops.most_common()),
            "unlink_reasons": dict(self.unlinks.most_common()),
            "relink": _timing(self.relinks_us),
            "never_relinked": self.never_relinked,
            "messages": dict(self.messages.most_common()),
            "left": self.left,
        }


@dataclass
class SessionStats:
    summary: SessionSummary
    users: dict[str, UserStats] = field(default_factory=dict)
    messages: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)

    @property
    def drops(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for user in self.users.values():
            total.update(user.drops)
        return total

    @property
    def relinks_us(self) -> list[int]:
        return [value for user in self.users.values() for value in user.relinks_us]

    def to_dict(self) -> dict[str, Any]:
        drops = self.drops
        return {
            **self.summary.to_dict(),
            "drops": sum(drops.values()),
            "drop_reasons": dict(drops.most_common()),
            "relink": _timing(self.relinks_us),
            "never_relinked": sum(user.never_relinked for user in self.users.values()),
            "messages": dict(self.messages.most_common()),
            "sent": dict(self.sent.most_common()),
            "per_user": [user.to_dict() for user in self.users.values()],
        }


@dataclass
class StatsReport:
    sessions: list[SessionStats]
    #: Each user over every session of the report.
    users: dict[str, UserStats]

    def to_dict(self) -> dict[str, Any]:
        return {"sessions": [s.to_dict() for s in self.sessions], "users": [u.to_dict() for u in self.users.values()]}


class _SessionFold:
    def __init__(self, log: Log, summary: SessionSummary) -> None:
        self.summary = summary
        self.registry = registry_at(log, summary.lobby, summary.first_seq - 1)
        self.result = SessionStats(summary)
        self.linked_since: dict[str, int] = {}
        self.dropped_at: dict[str, int] = {}
        for name, linked in self.registry.users.items():
            self.user(name)
            if linked:  # only after a crash: linked until the recovery unlinks them
                self.linked_since[name] = summary.start
        # A recovery unlink is dated at the restart, but its users dropped at the crash: the last event of
        # the session before (the best bound the log has), from which their time to relink counts.
        before = [s for s in log.sessions if s.lobby == summary.lobby and s.first_seq < summary.first_seq]
        self.crashed_at = before[-1].last_at if before else None

    def user(self, name: str) -> UserStats:
        found = self.result.users.get(name)
        if found is None:
            found = self.result.users[name] = UserStats(name)
        return found

    def event(self, event: Event) -> None:
        apply(self.registry, event)
        name = getattr(event, "username", None)
        kind = event.type
        if kind == "join":
            self.user(name)  # type: ignore[arg-type]
        elif kind == "link":
            user = self.user(name)  # type: ignore[arg-type]
            user.links += 1
            self.linked_since[name] = event.at  # type: ignore[index]
            dropped = self.dropped_at.pop(name, None)  # type: ignore[arg-type]
            if dropped is not None:
                user.relinks_us.append(event.at - dropped)
        elif kind == "unlink":
            user = self.user(name)  # type: ignore[arg-type]
            reason = event.reason  # type: ignore[attr-defined]
            user.unlinks[reason] += 1
            user.linked_us += event.at - self.linked_since.pop(name, event.at)  # type: ignore[arg-type]
            if reason not in NOT_DROPS:
                user.drops[reason] += 1
                recovered = reason == "recovered" and self.crashed_at is not None
                self.dropped_at[name] = self.crashed_at if recovered else event.at  # type: ignore[index]
        elif kind == "leave":
            self.user(name).left = event.reason  # type: ignore[arg-type, attr-defined]
            self.dropped_at.pop(name, None)  # type: ignore[arg-type]
        elif kind == "message":
            message_type = _message_type(event)
            self.user(name).messages[message_type] += 1  # type: ignore[arg-type]
            self.result.messages[message_type] += 1
        elif kind in ("send", "broadcast"):
            self.result.sent[_message_type(event)] += 1

    def finish(self) -> SessionStats:
        end = self.summary.end if self.summary.end is not None else self.summary.last_at
        for name, since in self.linked_since.items():
            self.user(name).linked_us += end - since
        for name in self.dropped_at:
            self.user(name).never_relinked += 1
        return self.result


def stats(path: str | os.PathLike[str], session: str | None = None, *, lobby: str | None = None) -> StatsReport:
    """Statistics of ``session`` (id or prefix), or of every session (of ``lobby``) when none is given."""
    with open_log(path) as log:
        if session is not None:
            chosen = [log.session(session, lobby)]
        else:
            name = log.lobby(lobby)  # one lobby: users of different lobbies differ, even of one name
            chosen = [s for s in log.sessions if s.lobby == name]
        total = sum(min(s.last_seq, log.upto) - s.first_seq + 1 for s in chosen)
        folds: dict[tuple[str, str], _SessionFold] = {}

        def events() -> Iterator[tuple[tuple[str, str], Event]]:
            for info in chosen:
                key = (info.lobby, info.session)
                folds[key] = _SessionFold(log, summarize(log, info))
                for event in log.session_events(info):
                    yield key, event

        for key, event in progress(events(), total=total, description="stats"):
            folds[key].event(event)
        results = [folds[(info.lobby, info.session)].finish() for info in chosen]
    users: dict[str, UserStats] = {}
    for result in results:
        for name, user in result.users.items():
            users.setdefault(name, UserStats(name)).merge(user)
    return StatsReport(results, users)

