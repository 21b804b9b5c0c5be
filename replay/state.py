"""``lobby replay state``, ``diff`` and ``step``: the registry at a point, between two points, event by event."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from events import Event, Registry, apply

from .index import registry_at
from .reader import ClockSpan, Log, ReplayError, SessionRange, format_time, iso_time, open_log
from .timeline import Moment, check_seq_range, to_microseconds

__all__ = ["StatePoint", "StateDiff", "state", "diff", "step", "state_in", "point_of"]


@dataclass(frozen=True, slots=True)
class StatePoint:
    """The registry of ``lobby`` after the event ``seq`` (0: before the log), which happened ``at``."""

    lobby: str
    seq: int
    at: int | None
    registry: Registry
    #: When ``seq`` is the last event of a session that ended without a close (the server died): the start of
    #: the next session, which unlinked its linked users (``recovered``). Until then they show as linked.
    died_until: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "lobby": self.lobby,
            "seq": self.seq,
            "time": iso_time(self.at) if self.at is not None else None,
            "session": self.registry.session,
            "closed": self.registry.closed,
            "users": self.registry.as_list(),
            "died_until": iso_time(self.died_until) if self.died_until is not None else None,
        }


@dataclass(frozen=True, slots=True)
class StateDiff:
    """What changed between two points: users who joined, left, got linked, got unlinked (net changes), and
    those back as they were that left and joined again (a kick, then a rejoin) or unlinked and linked again."""

    before: StatePoint
    after: StatePoint
    joined: list[str]
    left: list[str]
    linked: list[str]
    unlinked: list[str]
    rejoined: list[str] = field(default_factory=list)
    relinked: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.joined or self.left or self.linked or self.unlinked or self.rejoined or self.relinked)

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "joined": self.joined,
            "left": self.left,
            "linked": self.linked,
            "unlinked": self.unlinked,
            "rejoined": self.rejoined,
            "relinked": self.relinked,
        }


def point_of(
    log: Log,
    *,
    lobby: str | None = None,
    session: str | None = None,
    at_seq: int | None = None,
    at_time: Moment | None = None,
    default: str = "end",
) -> tuple[str, int]:
    """The lobby and seq a point names: ``at_seq``, or the last event at or before ``at_time``; without
    either, the end (``default="end"``) or the start (``"start"``: before its first event) of the session or log."""
    if at_seq is not None and at_time is not None:
        raise ReplayError("give a point as a seq or as a time, not both")
    info = log.session(session, lobby) if session is not None else None
    name = info.lobby if info is not None else log.lobby(lobby)
    if at_seq is not None:
        if not 0 <= at_seq <= log.upto:
            raise ReplayError(f"seq {at_seq} is not in the log (seqs 1..{log.upto}; 0 is before the first event)")
        if info is not None and not info.first_seq - 1 <= at_seq <= info.last_seq:
            raise ReplayError(
                f"seq {at_seq} is not in session {info.session} (seqs {info.first_seq}..{info.last_seq}; "
                f"{info.first_seq - 1} is before its first event)"
            )
        return name, at_seq
    if at_time is not None:
        moment = to_microseconds(at_time, ClockSpan.of(info) if info is not None else log.clock_span(name), end=True)
        if info is not None:
            _check_time_in(log, info, moment, at_time)
        return name, log.seq_at_time(moment, info, name)
    if info is not None:
        return name, info.first_seq - 1 if default == "start" else min(info.last_seq, log.upto)
    if default == "start":
        return name, 0
    return name, min(max(s.last_seq for s in log.sessions if s.lobby == name), log.upto)  # the lobby's end


def _check_time_in(log: Log, info: SessionRange, moment: int, given: Moment) -> None:
    """Refuse a time of ``info`` that falls in another session of its lobby (as a seq there is refused): at or
    before the last event of the session before it, or once the next one began. A time between the sessions
    is the state this one started from (before its first event), or the one it ended with."""
    same = [s for s in log.sessions if s.lobby == info.lobby]
    before = [s.last_at for s in same if s.last_seq < info.first_seq]
    after = [s.start for s in same if s.first_seq > info.last_seq]
    since, until = (max(before) if before else None), (min(after) if after else None)
    if (since is not None and moment <= since) or (until is not None and moment >= until):
        shown = given if isinstance(given, str) else format_time(moment)
        bounds = [f"after {format_time(since)}, the previous session's last event"] if since is not None else []
        bounds += [f"before {format_time(until)}, when the next began"] if until is not None else []
        raise ReplayError(f"time {shown} is not in session {info.session} ({' and '.join(bounds)})")


def state_in(log: Log, lobby: str, seq: int) -> StatePoint:
    sessions = [s for s in log.sessions if s.lobby == lobby]
    died_until = next((after.start for ended, after in zip(sessions, sessions[1:])
                       if ended.last_seq == seq and not ended.closed), None)
    return StatePoint(lobby=lobby, seq=seq, at=_at(log, seq, lobby), registry=registry_at(log, lobby, seq),
                      died_until=died_until)


def _at(log: Log, seq: int, lobby: str) -> int | None:
    """``at`` of the last event of ``lobby`` at or before ``seq``."""
    if seq <= 0:
        return None
    row = log.store.db.execute(
        "SELECT at FROM events WHERE seq <= ? AND sid IN (SELECT sid FROM sessions WHERE lobby = ?) "
        "ORDER BY seq DESC LIMIT 1",
        [seq, lobby],
    ).fetchone()
    return None if row is None else row[0]


def state(
    path: str | os.PathLike[str],
    *,
    lobby: str | None = None,
    session: str | None = None,
    at_seq: int | None = None,
    at_time: Moment | None = None,
) -> StatePoint:
    """The registry (users, linked or not) after seq ``at_seq`` or at time ``at_time``; without a point,
    at the end of ``session`` (id or prefix) or of the log. Equal to a full fold of the log up to that point."""
    with open_log(path) as log:
        name, seq = point_of(log, lobby=lobby, session=session, at_seq=at_seq, at_time=at_time)
        return state_in(log, name, seq)


def diff(
    path: str | os.PathLike[str],
    *,
    lobby: str | None = None,
    session: str | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    from_time: Moment | None = None,
    to_time: Moment | None = None,
) -> StateDiff:
    """Who joined, left, linked and unlinked between two points (defaults: the start and the end of
    ``session``, or of the log)."""
    with open_log(path) as log:
        name, first = point_of(log, lobby=lobby, session=session, at_seq=from_seq, at_time=from_time, default="start")
        _, second = point_of(log, lobby=name, session=session, at_seq=to_seq, at_time=to_time)
        if first > second:  # as timeline and step refuse a range backwards
            raise ReplayError(f"the first point (after seq {first}) is after the second (after seq {second})")
        result = compare(state_in(log, name, first), state_in(log, name, second))
        old, new = result.before.registry.users, result.after.registry.users
        gone: dict[str, set[str]] = {"leave": set(), "unlink": set()}
        events = log.read(first + 1, second, lobby=name, types=["leave", "unlink"])
        try:
            for event in events:
                gone[event.type].add(event.username)  # type: ignore[attr-defined]
        finally:
            events.close()  # type: ignore[attr-defined]
        rejoined = [user for user in new if user in old and user in gone["leave"]]
        relinked = [user for user, linked in new.items() if linked and old.get(user) and user in gone["unlink"]
                    and user not in rejoined]
        return dataclasses.replace(result, rejoined=rejoined, relinked=relinked)


def compare(before: StatePoint, after: StatePoint) -> StateDiff:
    old, new = before.registry.users, after.registry.users
    return StateDiff(
        before=before,
        after=after,
        joined=[name for name in new if name not in old],
        left=[name for name in old if name not in new],
        linked=[name for name, linked in new.items() if linked and not old.get(name, False)],
        unlinked=[name for name, linked in old.items() if linked and new.get(name) is False],  # left: in left only
    )


def step(
    path: str | os.PathLike[str],
    session: str | None = None,
    *,
    lobby: str | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
) -> Iterator[tuple[Event, Registry]]:
    """Walk ``session`` (default: the last one) event by event: each event with the registry after it (a copy)."""
    check_seq_range(from_seq, to_seq)
    log = open_log(path)
    try:
        info = log.session(session, lobby)
        start = info.first_seq if from_seq is None else max(info.first_seq, from_seq)
        end = min(info.last_seq, log.upto) if to_seq is None else min(info.last_seq, log.upto, to_seq)
        if start > end:  # the range misses the session: say so, as state and diff do
            asked = " ".join(f"{name} seq {value}" for name, value in (("from", from_seq), ("to", to_seq))
                             if value is not None)
            which = "" if session is not None else "; without -s, the last session"
            raise ReplayError(
                f"{asked}: no event of session {info.session} (seqs {info.first_seq}..{info.last_seq}{which})"
            )
        registry = registry_at(log, info.lobby, start - 1)
    except BaseException:
        log.close()
        raise
    return _walk(log, registry, log.read(start, end, lobby=info.lobby, session=info.session))


def _walk(log: Log, registry: Registry, events: Iterator[Event]) -> Iterator[tuple[Event, Registry]]:
    try:
        for event in events:
            apply(registry, event)
            yield event, registry.copy()
    finally:
        events.close()  # type: ignore[attr-defined]  # its cursor first, then the database
        log.close()
