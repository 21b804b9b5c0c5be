"""Opening a log for replay: read-only, at a fixed point, with sessions resolved by id or prefix.

Every replay command opens the log through :func:`open_log`. The view is pinned at the last seq present
when it was opened (``Log.upto``), so a command that runs while a server writes the file sees one
consistent log: later appends are simply not part of it.
"""

from __future__ import annotations

import os
import re
import sys
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from typing import Any

from events import Event, EventStore

__all__ = [
    "Log",
    "SessionRange",
    "ClockSpan",
    "ReplayError",
    "open_log",
    "parse_time",
    "format_time",
    "iso_time",
    "format_duration",
    "progress",
    "check_output",
]


class ReplayError(Exception):
    """A replay request that cannot be answered as asked: an unknown session, a bad time, a bad range."""


@dataclass(frozen=True, slots=True)
class SessionRange:
    """Where a session is in the log: its seqs, its first and last times, and the time of its close (``end``,
    ``None`` without close). Cheap to read, whatever the size of the log (no scan of its events)."""

    lobby: str
    session: str
    sid: int
    first_seq: int
    last_seq: int
    start: int
    last_at: int
    end: int | None

    @property
    def closed(self) -> bool:
        return self.end is not None


@dataclass(frozen=True, slots=True)
class ClockSpan:
    """Where a bare clock time (``21:03``) is looked for: the times of a session or of a log (UTC microseconds),
    and what to call it in an error."""

    start: int
    last: int
    name: str

    @classmethod
    def of(cls, session: SessionRange) -> ClockSpan:
        return cls(session.start, max(session.last_at, session.end or 0), f"session {session.session}")


class Log:
    """A read-only event log at a fixed point (``upto``: the last seq when opened)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self.store = EventStore.open_readonly(path)
        #: Iterators over the store still open: closed before the store, so none outlives its database.
        self._reading: weakref.WeakSet[Any] = weakref.WeakSet()
        try:
            self.upto = self.store.last_seq
            self._sessions: list[SessionRange] | None = None
        except BaseException:
            self.store.close()
            raise

    def close(self) -> None:
        for events in list(self._reading):
            events.close()
        self.store.close()
        if sys.exc_info()[0] is None:  # a whole answer: it must come from a log that did not change meanwhile
            self.store.check_unchanged()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions -----------------------------------------------------------------------------------------

    @property
    def sessions(self) -> list[SessionRange]:
        """Every session of the log, in the order they started (those begun after ``upto`` left out)."""
        if self._sessions is None:
            db = self.store.db
            row = db.execute("SELECT code FROM types WHERE name = 'close'").fetchone()
            close_code = row[0] if row else None
            found = []
            for sid, lobby, session, first, last in db.execute(
                "SELECT sid, lobby, session, first_seq, last_seq FROM sessions WHERE first_seq <= ? "
                "ORDER BY first_seq", [self.upto]
            ).fetchall():
                # The last event at or before upto (a writer may have gone on since this log was opened).
                last_row = db.execute(
                    "SELECT seq, at, type FROM events WHERE sid = ? AND seq BETWEEN ? AND ? ORDER BY seq DESC LIMIT 1",
                    [sid, first, min(last, self.upto)],
                ).fetchone()
                # Its first row, even when a damaged log lost the listen (verify says so): listed all the same.
                first_row = db.execute(
                    "SELECT at FROM events WHERE sid = ? AND seq BETWEEN ? AND ? ORDER BY seq LIMIT 1",
                    [sid, first, min(last, self.upto)],
                ).fetchone()
                if last_row is None or first_row is None:
                    continue
                end = last_row[1] if last_row[2] == close_code else None
                found.append(SessionRange(lobby, session, sid, first, last_row[0], first_row[0], last_row[1], end))
            self._sessions = found
        return self._sessions

    def session_counts(self, session: SessionRange) -> tuple[int, dict[str, int]]:
        """How many distinct users a session has seen, and its events by type (most first)."""
        db = self.store.db
        span = [session.sid, session.first_seq, session.last_seq]
        where = "sid = ? AND seq BETWEEN ? AND ?"
        counts = dict(db.execute(
            f"SELECT t.name, count(*) FROM events e JOIN types t ON t.code = e.type WHERE {where} GROUP BY t.name",
            span,
        ).fetchall())
        users = db.execute(f"SELECT count(DISTINCT username) FROM events WHERE {where}", span).fetchone()[0]
        return users, dict(sorted(counts.items(), key=lambda item: -item[1]))

    def lobbies(self) -> list[str]:
        return sorted({s.lobby for s in self.sessions})

    def lobby(self, name: str | None = None) -> str:
        """``name`` if the log has that lobby; without a name, the log's only lobby."""
        lobbies = self.lobbies()
        if name is not None:
            if name not in lobbies:
                known = ", ".join(lobbies) or "none"
                raise ReplayError(f"{self.path}: no lobby {name!r} in this log (lobbies: {known})")
            return name
        if not lobbies:
            raise ReplayError(f"{self.path}: the log has no events")
        if len(lobbies) > 1:
            raise ReplayError(f"{self.path}: the log has several lobbies ({', '.join(lobbies)}); pick one with --lobby")
        return lobbies[0]

    def session(self, ref: str | None = None, lobby: str | None = None) -> SessionRange:
        """The session named ``ref`` (its id, a unique prefix of it, or ``last``) of ``lobby`` (any lobby when
        ``None``). Without ``ref``, the last session of the log (or of ``lobby``)."""
        candidates = [s for s in self.sessions if lobby is None or s.lobby == lobby]
        if lobby is not None and not candidates and lobby not in self.lobbies():
            self.lobby(lobby)  # raises the unknown-lobby error
        if not candidates:
            raise ReplayError(f"{self.path}: the log has no sessions")
        if ref is None or ref == "last":
            if lobby is None and len({s.lobby for s in candidates}) > 1:
                raise ReplayError(
                    f"{self.path}: the log has several lobbies ({', '.join(self.lobbies())}); "
                    "which one's last session? pick it with --lobby"
                )
            return candidates[-1]
        if not ref:
            raise ReplayError("a session is named by its id, a unique prefix of it, or last; not an empty string")
        exact = [s for s in candidates if s.session == ref]
        found = exact or [s for s in candidates if s.session.startswith(ref)]
        if not found:
            known = ", ".join(s.session for s in candidates[-5:])
            raise ReplayError(
                f"{self.path}: unknown session {ref!r} (the log has {len(candidates)} sessions; latest: {known}; "
                "see 'lobby replay sessions')"
            )
        if len(found) > 1:
            named = ", ".join(f"{s.lobby}/{s.session}" for s in found[:6])
            raise ReplayError(f"{self.path}: session {ref!r} is ambiguous ({named}); give more of its id or --lobby")
        return found[0]

    def next_session(self, session: SessionRange) -> SessionRange | None:
        """The session of the same lobby that started after ``session`` (a restart), if any."""
        later = [s for s in self.sessions if s.lobby == session.lobby and s.first_seq > session.first_seq]
        return later[0] if later else None

    # -- events -------------------------------------------------------------------------------------------

    def read(self, from_seq: int = 1, to_seq: int | None = None, **filters: Any) -> Iterator[Event]:
        """``EventStore.read`` bounded by ``upto``."""
        bound = self.upto if to_seq is None else min(to_seq, self.upto)
        if bound < from_seq:
            return (event for event in ())  # a generator like every read: it has close()
        events = self.store.read(from_seq, bound, **filters)
        self._reading.add(events)
        return events

    def session_events(self, session: SessionRange, **filters: Any) -> Iterator[Event]:
        return self.read(session.first_seq, session.last_seq, lobby=session.lobby, session=session.session, **filters)

    def clock_span(self, lobby: str | None = None) -> ClockSpan | None:
        """Where a bare clock time is looked for without a session: the whole log (of ``lobby``)."""
        sessions = [s for s in self.sessions if lobby is None or s.lobby == lobby]
        if not sessions:
            return None
        spans = [ClockSpan.of(s) for s in sessions]
        whole_log = len(sessions) == len(self.sessions)
        return ClockSpan(min(s.start for s in spans), max(s.last for s in spans),
                         "the log" if whole_log else f"lobby {lobby}'s sessions")

    def at_of(self, seq: int, lobby: str | None = None) -> int | None:
        """``at`` of the first event (of ``lobby``, if given) at or after ``seq`` (``None`` past the end)."""
        if lobby is None:
            row = self.store.db.execute(
                "SELECT at FROM events WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT 1", [seq, self.upto]
            ).fetchone()
        else:
            row = self.store.db.execute(
                "SELECT at FROM events WHERE seq >= ? AND seq <= ? "
                "AND sid IN (SELECT sid FROM sessions WHERE lobby = ?) ORDER BY seq LIMIT 1",
                [seq, self.upto, lobby],
            ).fetchone()
        return None if row is None else row[0]

    def seq_at_time(self, at: int, session: SessionRange | None = None, lobby: str | None = None) -> int:
        """The last seq whose event (of ``session``'s lobby, or of ``lobby``) happened at or before ``at`` (0
        before the log, ``first_seq - 1`` before ``session``). A binary search on the primary key: ``at``
        does not decrease along one lobby's events (lobbies sharing a log interleave their clocks), so a
        log of several lobbies needs the lobby."""
        if session is not None:
            lobby = session.lobby
        elif lobby is None and len(self.lobbies()) > 1:
            raise ReplayError(f"{self.path}: the log has several lobbies ({', '.join(self.lobbies())}); "
                              "a time needs one: pick it with --lobby")
        low = session.first_seq if session is not None else 1
        high = min(session.last_seq, self.upto) if session is not None else self.upto
        answer = low - 1
        while low <= high:
            middle = (low + high) // 2
            found = self.at_of(middle, lobby)
            if found is not None and found <= at:
                answer, low = middle, middle + 1
            else:
                high = middle - 1
        return answer


def check_output(log_path: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Refuse to write ``output`` if it is the log or one of SQLite's files beside it (replay never writes
    the log: a server may be appending to it), or a directory."""
    if not os.fspath(output):
        raise ReplayError("the output file is an empty path; give a file path")
    log = os.path.realpath(log_path)
    target = os.path.realpath(output)
    same = os.path.exists(target) and os.path.exists(log) and os.path.samefile(target, log)
    beside = target in (log + "-wal", log + "-shm", log + "-journal")
    # A lobby's lock file (<log>-<lobby>.lock): replaced, it would no longer keep a second server off the lobby.
    if same or beside or (target.startswith(log + "-") and target.endswith(".lock")):
        raise ReplayError(
            f"{os.fspath(output)}: is the event log itself (or its -wal/-shm or lock file); write elsewhere"
        )
    if os.path.isdir(target):
        raise ReplayError(f"{os.fspath(output)}: is a directory; give a file path")


def open_log(path: str | os.PathLike[str]) -> Log:
    """Open ``path`` read-only; raises ``events.EventLogError`` for a missing, foreign or newer file."""
    return Log(path)


# -- times --------------------------------------------------------------------------------------------------

_CLOCK = re.compile(r"^\d{1,2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$", re.IGNORECASE)
#: A time's zone, at its end: Z, +01, +0100, +01:00.
_ZONE = re.compile(r"(?:Z|[+-]\d{2}(?::?\d{2})?)$", re.IGNORECASE)
_DAY = 86_400_000_000


def parse_time(text: str, span: ClockSpan | None = None, *, end: bool = False, whole: bool = False) -> int:
    """UTC microseconds from an ISO 8601 time (``2026-11-27T21:03:00Z``; no zone means UTC) or a clock time
    (``21:03``, ``21:03:00.5``, ``21:03+01:00``) on the one UTC date in ``span`` that has it.

    A time names the whole of its last unit: ``21:03`` the minute, ``21:03:00.531`` that millisecond. It is
    that unit's start, but for a point or an upper bound (``end``) given to the second or finer: its end, so a
    time pasted from the millisecond output includes the events printed with it; and for an upper bound
    (``whole``) its end whatever the unit: ``--until 21:03`` includes 21:03:59."""
    text = text.strip()
    width = _width(text)
    widen = width - 1 if end and (whole or width <= 1_000_000) else 0
    return _parse_time(text, span, width) + widen


def _width(text: str) -> int:
    """Microseconds of the last unit ``text`` gives: a day, an hour, a minute, a second, a fraction (in every
    form ``fromisoformat`` reads: 21:03, 2103, 2026-11-27T21, 20261127T210300Z, ...)."""
    if not _CLOCK.match(text):
        _, separator, text = text.replace(" ", "T", 1).partition("T")
        if not separator:
            return _DAY  # a date alone
    clock = _ZONE.sub("", text) if len(text) > 2 else text
    clock, _, fraction = clock.replace(",", ".").partition(".")
    if fraction:
        return 10 ** max(0, 6 - len(fraction))
    digits = len(clock.replace(":", ""))
    return {2: 3_600_000_000, 4: 60_000_000}.get(digits, 1_000_000)


def _parse_time(text: str, span: ClockSpan | None, width: int) -> int:
    if _CLOCK.match(text):
        if span is None:
            raise ReplayError(f"time {text!r} has no date; give a full time like 2026-11-27T{text}")
        clock = "0" + text if text.index(":") == 1 else text
        try:
            of_day = time.fromisoformat(clock.upper())
        except ValueError as error:
            raise ReplayError(f"cannot read time {text!r}: {error}") from None
        return _on_its_day(text, of_day, span, width)
    try:
        moment = datetime.fromisoformat(text.replace(" ", "T", 1))
    except ValueError:
        raise ReplayError(f"cannot read time {text!r}; use ISO 8601 like 2026-11-27T21:03:00Z or 21:03") from None
    return microseconds(moment)


def microseconds(moment: datetime) -> int:
    """UTC microseconds of a datetime (one without a zone is UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _on_its_day(text: str, of_day: time, span: ClockSpan, width: int) -> int:
    """A clock time on the day of ``span`` that has it: the only one, or, when it is in none, the span's only
    day; on several days, or in none of several, the date must be given."""
    first = datetime.fromtimestamp(span.start / 1_000_000, tz=timezone.utc).date()
    last = datetime.fromtimestamp(span.last / 1_000_000, tz=timezone.utc).date()
    days = [first + timedelta(days=n) for n in range(-1, (last - first).days + 2)]  # a zone may move it a day
    moments = {day: microseconds(datetime.combine(day, of_day)) for day in days}
    within = [day for day, moment in moments.items() if moment <= span.last and moment + width > span.start]
    if len(within) == 1:
        return moments[within[0]]
    if not within and first == last:
        return moments[first]  # before or after a session of one day: the command says what that means
    example = (within or [first])[0].isoformat() + "T" + text
    if within:
        dates = ", ".join(day.isoformat() for day in within)
        raise ReplayError(f"time {text!r} is on more than one day of {span.name} ({dates}); give the date, like {example}")
    raise ReplayError(f"time {text!r} is not in {span.name} ({format_time(span.start)} to {format_time(span.last)} "
                      f"UTC); give the date, like {example}")


def format_time(at: int | None, *, date: bool = True) -> str:
    """``2026-11-27 21:03:00.123`` (UTC, milliseconds)."""
    if at is None:
        return "-"
    moment = datetime.fromtimestamp(at / 1_000_000, tz=timezone.utc)
    text = moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return f"{text}.{moment.microsecond // 1000:03d}"


def iso_time(at: int) -> str:
    moment = datetime.fromtimestamp(at / 1_000_000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


def format_duration(microseconds: int | float | None) -> str:
    """``1h02m03s``, ``4.250s``, ``-`` for none."""
    if microseconds is None:
        return "-"
    seconds = microseconds / 1_000_000
    if seconds < 60:
        return f"{seconds:.3f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


# -- progress -----------------------------------------------------------------------------------------------


def progress(items: Iterable[Any], *, total: int | None, description: str, unit: str = "event") -> Iterable[Any]:
    """``items`` with a progress bar on stderr, shown only on a terminal and only once the work takes more
    than a moment (half a second); elsewhere (pipes, tests, log files) the items pass through untouched."""
    if not _show_progress():
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=description, unit=unit, unit_scale=True, delay=0.5, file=sys.stderr,
                leave=False, mininterval=0.2)


def _show_progress() -> bool:
    if os.environ.get("LOBBY_REPLAY_PROGRESS", "").lower() in ("0", "false", "no", "off"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
