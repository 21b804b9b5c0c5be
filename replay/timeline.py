"""``lobby replay timeline`` (alias ``show``): the events of a session (or of the whole log) in order,
filtered by user, type, time range and seq range, or as one user's client saw them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from events import EVENT_TYPES, Event

from .index import registry_at
from .reader import ClockSpan, Log, ReplayError, microseconds, open_log, parse_time

__all__ = ["Selection", "seen_by", "select", "timeline", "to_microseconds"]

Moment = str | int | datetime


def to_microseconds(value: Moment, span: ClockSpan | None = None, *, end: bool = False, whole: bool = False) -> int:
    """UTC microseconds from a datetime, an int (already microseconds) or a string (see ``parse_time``,
    and its ``end`` and ``whole``)."""
    if isinstance(value, datetime):
        return microseconds(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ReplayError(f"a time is a string, a datetime or microseconds (an int), not {value!r}")
    return parse_time(value, span, end=end, whole=whole)


def _names(values: Iterable[str]) -> frozenset[str]:
    """One name, or several: a string is one name, not its letters."""
    return frozenset((values,) if isinstance(values, str) else values)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events of a log to read: a seq range, a lobby and session, users and types, a time range."""

    from_seq: int
    to_seq: int
    lobby: str | None = None
    session: str | None = None
    users: frozenset[str] | None = None
    types: frozenset[str] | None = None
    since: int | None = None
    until: int | None = None
    #: Only what this user's client was sent, and what it did (see ``seen_by``).
    seen_by: str | None = None

    def read(self, log: Log) -> Iterator[Event]:
        single_user = next(iter(self.users)) if self.users is not None and len(self.users) == 1 else None
        events: Iterator[Event] = log.read(
            self.from_seq, self.to_seq, lobby=self.lobby, session=self.session, username=single_user,
            types=sorted(self.types) if self.types is not None and self.seen_by is None else None,
        )
        if self.seen_by is not None:  # which events it keeps depends on all of them: types filtered after
            events = seen_by(log, events, self.seen_by)
            if self.types is not None:
                events = (event for event in events if event.type in self.types)
        for event in events:
            if self.users is not None and getattr(event, "username", None) not in self.users:
                continue
            if self.since is not None and event.at < self.since:
                continue
            if self.until is not None and event.at > self.until:
                continue
            yield event


def seen_by(log: Log, events: Iterator[Event], username: str) -> Iterator[Event]:
    """Of ``events`` (in seq order, none left out), those ``username``'s client was sent frames for while it was
    linked (KRMX.md: every user's join, link, unlink and leave, broadcasts that did not skip it, sends to it), its
    own lifecycle (its link brings it everyone, its leave its own ``krmx/left``), what it sent (its messages, its
    cut-offs), and the sessions' starts and ends."""
    linked: dict[str, bool] = {}  # by lobby: a log may hold several
    for event in events:
        kind, own = event.type, getattr(event, "username", None) == username
        was = linked.get(event.lobby)
        if was is None:
            was = registry_at(log, event.lobby, (event.seq or 1) - 1).users.get(username, False)
        if kind in ("listen", "close"):
            shown = True
        elif kind == "broadcast":
            shown = was and event.skip != username  # type: ignore[attr-defined]
        elif kind in ("join", "link", "unlink", "leave"):
            shown = was or own
        else:
            shown = own
        if kind == "listen":
            linked[event.lobby] = False  # a session starts with every user unlinked
        elif own and kind in ("link", "unlink", "leave"):
            linked[event.lobby] = kind == "link"
        else:
            linked[event.lobby] = was
        if shown:
            yield event


def check_seq_range(from_seq: int | None, to_seq: int | None) -> None:
    """Raise ``ReplayError`` for bounds given the wrong way round: a mistake to say, not an empty answer."""
    if from_seq is not None and to_seq is not None and from_seq > to_seq:
        raise ReplayError(f"from seq {from_seq} is after to seq {to_seq}")


def select(
    log: Log,
    session: str | None = None,
    *,
    lobby: str | None = None,
    users: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    seen_by: str | None = None,
) -> Selection:
    """Resolve the filters against ``log`` (unknown session, type or lobby, a range that ends before it
    starts: ``ReplayError``)."""
    check_seq_range(from_seq, to_seq)
    if seen_by is not None and users is not None:
        raise ReplayError("give either users or seen_by: the events of some users, or what one user's client saw")
    if lobby is not None:
        log.lobby(lobby)
    low, high = 1, log.upto
    info = None
    if session is not None:
        info = log.session(session, lobby)
        low, high = info.first_seq, min(info.last_seq, log.upto)
    # A range that starts past the end, or misses its session, is a mistake to say, not an empty answer (an end
    # past the last seq is "to the end").
    if from_seq is not None and from_seq > log.upto:
        raise ReplayError(f"from seq {from_seq} is past the end of the log (seqs 1..{log.upto})")
    if info is not None and ((from_seq or low) > high or (to_seq if to_seq is not None else high) < low):
        raise ReplayError(f"seqs {from_seq or low}..{to_seq if to_seq is not None else high} are not in session "
                          f"{info.session} (seqs {low}..{high})")
    if from_seq is not None:
        low = max(low, from_seq)
    if to_seq is not None:
        high = min(high, to_seq)
    wanted_types = None
    if types is not None:
        wanted_types = _names(types)
        unknown = sorted(wanted_types - EVENT_TYPES.keys())
        if unknown:
            raise ReplayError(f"unknown event type {', '.join(unknown)} (types: {', '.join(EVENT_TYPES)})")
    span = ClockSpan.of(info) if info is not None else log.clock_span(lobby)
    since_us = to_microseconds(since, span) if since is not None else None
    until_us = to_microseconds(until, span, end=True, whole=True) if until is not None else None
    if since_us is not None and until_us is not None and since_us > until_us:
        raise ReplayError(f"since {since} is after until {until}")
    # Narrow the seqs by time where one lobby's clock orders them; the events are filtered by time anyway.
    ordered = info is not None or lobby is not None or len(log.lobbies()) <= 1
    if since_us is not None and ordered:
        low = max(low, log.seq_at_time(since_us - 1, info, lobby) + 1)
    if until_us is not None and ordered:
        high = min(high, log.seq_at_time(until_us, info, lobby))
    return Selection(
        from_seq=low, to_seq=high,
        lobby=info.lobby if info is not None else lobby,
        session=info.session if info is not None else None,
        users=_names(users) if users is not None else None,
        types=wanted_types, since=since_us, until=until_us, seen_by=seen_by,
    )


def timeline(
    path: str | os.PathLike[str],
    session: str | None = None,
    *,
    lobby: str | None = None,
    users: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    seen_by: str | None = None,
) -> Iterator[Event]:
    """The events of ``session`` (id or prefix; the whole log without one) in seq order, lazily.

    Filters combine: ``users`` and ``types`` are sets to keep, ``since``/``until`` a time range (ISO 8601,
    ``21:03`` on the date of the session or log that has it, a datetime or UTC microseconds), ``from_seq``/``to_seq`` a seq range.
    ``seen_by`` (instead of ``users``) keeps what that user's client was sent, and what it did (see
    :func:`seen_by`). A bad filter raises at once; the log is closed when the iterator is exhausted or closed.
    """
    log = open_log(path)
    try:
        selection = select(log, session, lobby=lobby, users=users, types=types, since=since, until=until,
                           from_seq=from_seq, to_seq=to_seq, seen_by=seen_by)
    except BaseException:
        log.close()
        raise
    return _events(log, selection)


def _events(log: Log, selection: Selection) -> Iterator[Event]:
    try:
        yield from selection.read(log)
    finally:
        log.close()
