"""``lobby replay logs``: the server's JSON log lines, joined to the events they are about by seq.

The server writes one JSON object per line on stderr (structlog), with ``lobby``, ``session``, ``seq`` and
``username`` bound to the lines about an event (``{"seq": 5, "event": "unlink", "reason": "dropped", ...}``)
and without ``seq`` for the others (``listening``, ``closed``, a listener's traceback outside a turn).
Lines that are not JSON (a stray print, the standard library's warnings) are kept as text.

``logs(..., around_seq=N)`` answers "what did the server log around seq N": the events ``N-window``..
``N+window`` interleaved with the lines about them and the lines without seq written meanwhile.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from events import EVENT_TYPES, Event

from .reader import ClockSpan, Log, ReplayError, SessionRange, iso_time, open_log, parse_time, progress
from .render import event_json

__all__ = ["LogLine", "Entry", "LogSummary", "read_log_lines", "logs", "log_summary", "LEVELS"]

LEVELS = ("debug", "info", "warning", "error", "critical")
#: Problems a summary lists at most; it counts the rest.
MAX_PROBLEMS = 1000
#: Keys every line may carry; the rest is what the line says.
COMMON_KEYS = ("lobby", "session", "seq", "username", "event", "level", "timestamp")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class LogLine:
    number: int
    #: The parsed JSON object; ``None`` for a line that is not one (see ``text``).
    record: dict[str, Any] | None
    text: str

    @property
    def seq(self) -> int | None:
        seq = self.record.get("seq") if self.record else None
        return seq if type(seq) is int else None  # not a bool: true is no seq

    @property
    def username(self) -> str | None:
        username = self.record.get("username") if self.record else None
        return username if isinstance(username, str) else None

    @property
    def at(self) -> int | None:
        stamp = self.record.get("timestamp") if self.record else None
        if not isinstance(stamp, str):
            return None
        try:
            moment = datetime.fromisoformat(stamp)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            moment.astimezone(timezone.utc)  # a time that is no UTC date (year 9999 at -01:00) is no time
        except (ValueError, OverflowError):
            return None
        return (moment - _EPOCH) // timedelta(microseconds=1)

    @property
    def level(self) -> str:
        level = self.record.get("level") if self.record else None
        return level if isinstance(level, str) else "-"

    @property
    def message(self) -> str:
        message = self.record.get("event") if self.record else None
        return message if isinstance(message, str) else self.text

    def fields(self) -> dict[str, Any]:
        """What the line says beyond the common keys."""
        return {k: v for k, v in (self.record or {}).items() if k not in COMMON_KEYS}


#: Lines without seq kept to show right before a window's first event, at most.
MAX_BEFORE = 1000


def read_log_lines(path: str | os.PathLike[str]) -> Iterator[LogLine]:
    """Every line of a server log file, in order (a progress bar by bytes on a terminal)."""
    target = Path(path)
    if target.is_dir():
        raise ReplayError(f"{path}: is a directory, not a server log file")
    if not target.exists():  # a pipe or a FIFO is fine: <(zcat server.log.1.gz), /dev/stdin
        raise ReplayError(f"{path}: no such log file")
    with open(target, "rb") as handle:
        if handle.peek(16)[:16] == b"SQLite format 3\x00":  # the arguments swapped, most likely
            raise ReplayError(f"{path}: is an SQLite database, not a server log file (the event log goes in --db)")
        for number, raw in enumerate(progress(handle, total=None, description="reading log lines", unit="line"), 1):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            record = None
            if line.startswith(b"{"):
                try:
                    parsed = orjson.loads(line)
                except orjson.JSONDecodeError:
                    parsed = None
                record = parsed if isinstance(parsed, dict) else None
            yield LogLine(number, record, line.decode("utf-8", "replace"))


def _mismatch(line: LogLine, event: Event | None) -> str | None:
    """Why a line does not fit the event its seq names, if it does not."""
    if event is None:
        return f"seq {line.seq} is not in the event log (another log file, or a log cut short)"
    record = line.record or {}
    session = record.get("session")
    if isinstance(session, str) and session != event.session:
        return f"line of session {session}, but seq {event.seq} is of session {event.session}"
    username = line.username
    if username is not None and getattr(event, "username", None) not in (None, username):
        return f"line about {username}, but seq {event.seq} is about {getattr(event, 'username', None)}"
    if line.message in EVENT_TYPES and line.message != event.type:
        return f"line says {line.message}, but seq {event.seq} is a {event.type}"
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of a joined view: an event of the log (``kind="event"``) or a line of the server log
    (``kind="log"``, with the event its seq names, if any, and ``note`` when they do not fit)."""

    kind: str
    at: int | None
    seq: int | None
    event: Event | None = None
    line: LogLine | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "event":
            assert self.event is not None
            return {"kind": "event", **event_json(self.event)}
        assert self.line is not None
        data: dict[str, Any] = {"kind": "log", "line": self.line.number}
        data.update(self.line.record if self.line.record is not None else {"text": self.line.text})
        data["event_type"] = self.event.type if self.event is not None else None
        if self.note:
            data["note"] = self.note
        return data


def _shown(line: LogLine, level: str | None, username: str | None) -> bool:
    return _level_ok(line, level) and (username is None or line.username == username)


def _level_ok(line: LogLine, minimum: str | None) -> bool:
    if minimum is None:
        return True
    level = line.level.lower()
    return level in LEVELS and LEVELS.index(level) >= LEVELS.index(minimum)


def _check_level(level: str | None) -> None:
    if level is not None and level not in LEVELS:
        raise ReplayError(f"unknown level {level!r} (levels: {', '.join(LEVELS)})")


def logs(
    logfile: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    around_seq: int | None = None,
    window: int = 10,
    session: str | None = None,
    level: str | None = None,
    username: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> Iterator[Entry]:
    """The lines of the server log ``logfile``, each joined to the event of ``db`` its seq names, as they
    are read (a log of millions of lines is never held whole).

    With ``around_seq``: the events ``around_seq - window`` .. ``around_seq + window`` (of ``session``'s
    lobby, when given) with, after each, the lines about it, and the lines without seq of that time span,
    in time order. Otherwise every line (of ``session``, at ``level`` or above, about ``username``, logged from
    ``since`` up to ``until``: times as ``timeline`` reads them), with its event. Bad arguments raise before
    the first entry.
    """
    _check_level(level)
    if window < 0:
        raise ReplayError("--window must be 0 or more")
    if around_seq is not None and (since is not None or until is not None):
        raise ReplayError("give --around-seq or a time range (--since, --until), not both")
    log = open_log(db)
    try:
        info = log.session(session) if session is not None else None
        span = ClockSpan.of(info) if info is not None else log.clock_span()
        low = parse_time(since, span) if since is not None else None
        high = parse_time(until, span, end=True, whole=True) if until is not None else None
        lines = read_log_lines(logfile)
        if around_seq is not None:
            entries: Iterator[Entry] = iter(_around(log, lines, around_seq, window, level, username, info))
        else:
            first = next(lines, None)  # a missing or swapped file fails here, not at the first next()
            entries = (
                _joined(log, line)
                for line in itertools.chain([first] if first is not None else [], lines)
                if _level_ok(line, level)
                and (info is None or (line.record or {}).get("session") == info.session)
                and (username is None or line.username == username)
                and _in_time(line, low, high)
            )
    except BaseException:
        log.close()
        raise
    return _closing(entries, log)


def _in_time(line: LogLine, low: int | None, high: int | None) -> bool:
    if low is None and high is None:
        return True
    at = line.at  # a line without a time is outside any range
    return at is not None and (low is None or at >= low) and (high is None or at <= high)


def _closing(entries: Iterator[Entry], log: Log) -> Iterator[Entry]:
    with log:
        yield from entries


def _joined(log: Log, line: LogLine) -> Entry:
    seq = line.seq
    if seq is None:
        return Entry("log", line.at, None, line=line)
    event = next(iter(log.read(seq, seq)), None)
    return Entry("log", event.at if event is not None else line.at, seq, event=event, line=line,
                 note=_mismatch(line, event))


def _around(log: Log, lines: Iterator[LogLine], seq: int, window: int, level: str | None,
            username: str | None, info: SessionRange | None) -> list[Entry]:
    if not 1 <= seq <= log.upto:
        raise ReplayError(f"seq {seq} is not in the event log (seqs 1..{log.upto})")
    if info is not None and not info.first_seq <= seq <= info.last_seq:
        raise ReplayError(f"seq {seq} is not in session {info.session} (seqs {info.first_seq}..{info.last_seq})")
    low, high = max(1, seq - window), min(log.upto, seq + window)
    filters = {"lobby": info.lobby, "session": info.session} if info is not None else {}
    events = {event.seq: event for event in log.read(low, high, **filters)}
    sessions = {event.session for event in events.values()}
    first = min(event.at for event in events.values())
    last = max(event.at for event in events.values())
    # Sorted by (time, seq, events before lines, line number). A line without seq goes with the lines around
    # it in the file, whatever its own time (event times hold while the clock is stepped back; the log's do not):
    # between two lines of the window, after the event of the line before it; next to the window (no line of
    # another event in between: a cut-off's warning, logged before its event is committed; what a close logs
    # after its event), before the window's first event or after its last. Other lines without seq go by time.
    keyed = [((event.at, event.seq, 0, 0), Entry("event", event.at, event.seq, event=event))
             for event in events.values()]
    anchor: tuple[int, int] | None = None  # (at, seq) of the last line of the window so far
    before: deque[LogLine] = deque()  # lines without seq since the last line of an event, before the window's
    pending: list[LogLine] = []  # lines without seq since the window's last line so far
    ended = False  # a line of an event after the window came: lines without seq from then on go by time

    def by_time(line: LogLine) -> None:
        if line.at is not None and first <= line.at <= last:
            keyed.append(((line.at, high + 1, 1, line.number), Entry("log", line.at, None, line=line)))

    def at_anchor(waiting: list[LogLine]) -> None:
        for line in waiting:
            keyed.append(((*anchor, 1, line.number), Entry("log", anchor[0], None, line=line)))  # type: ignore[misc]
        waiting.clear()

    for line in lines:
        line_seq = line.seq
        if line_seq is not None and low <= line_seq <= high and (info is None or line_seq in events):
            at_anchor(pending)
            event = events.get(line_seq)
            at = event.at if event is not None else (line.at or 0)
            if anchor is None:  # the window's first line: what was logged right before it comes first
                for waiting in before:
                    keyed.append(((at, line_seq, -1, waiting.number), Entry("log", at, None, line=waiting)))
                before.clear()
            anchor = (at, line_seq)
            if _shown(line, level, username):
                keyed.append(((at, line_seq, 1, line.number),
                              Entry("log", at, line_seq, event=event, line=line, note=_mismatch(line, event))))
        elif line_seq is not None:  # a line of an event outside the window
            if anchor is None:  # they belong with that event: inside the window's times (its events may have
                for waiting in before:  # no lines, at --log-level info say), they go by time
                    by_time(waiting)
                before.clear()
            elif not ended:
                at_anchor(pending)
                ended = True
        elif _shown(line, level, username):
            line_session = (line.record or {}).get("session")
            if line_session is not None and line_session not in sessions:
                continue
            if anchor is None:
                if len(before) == MAX_BEFORE:  # a flood of them (rejected links): the oldest go by time
                    by_time(before.popleft())
                before.append(line)
            elif not ended:
                pending.append(line)
            else:
                by_time(line)
    if anchor is not None:
        at_anchor(pending)  # the log ends after the window
    for line in before:  # no line of the window's events at all
        by_time(line)
    keyed.sort(key=lambda pair: pair[0])
    entries = [entry for _, entry in keyed]
    return entries


@dataclass
class LogSummary:
    """Counts over a server log file: by level and by what the lines say, and what does not fit the event log."""

    lines: int = 0
    not_json: int = 0
    with_seq: int = 0
    levels: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    #: Lines at warning or above, and lines that do not fit the event log: (line, note), the first
    #: MAX_PROBLEMS of them (a log checked against the wrong event log can have millions).
    problems: list[tuple[LogLine, str]] = field(default_factory=list)
    #: How many more there were.
    more_problems: int = 0

    def add_problem(self, line: LogLine, note: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append((line, note))
        else:
            self.more_problems += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": self.lines, "not_json": self.not_json, "with_seq": self.with_seq,
            "levels": dict(self.levels.most_common()), "messages": dict(self.messages.most_common()),
            "sessions": dict(self.sessions.most_common()),
            "problems": [{"line": line.number, "seq": line.seq, "level": line.level, "message": line.message,
                          "time": iso_time(line.at) if line.at is not None else None, "note": note}
                         for line, note in self.problems],
            "more_problems": self.more_problems,
        }


def log_summary(logfile: str | os.PathLike[str], db: str | os.PathLike[str] | None = None) -> LogSummary:
    """Counts by level, message and session; warnings, errors and lines that do not fit ``db``'s events."""
    summary = LogSummary()
    log = open_log(db) if db is not None else None
    try:
        for line in read_log_lines(logfile):
            summary.lines += 1
            if line.record is None:  # a failed start's one line, a traceback printed by hand, ...
                summary.not_json += 1
                summary.add_problem(line, f"not JSON: {line.text[:100]}")
                continue
            summary.levels[line.level] += 1
            summary.messages[line.message] += 1
            session = line.record.get("session")
            if isinstance(session, str):
                summary.sessions[session] += 1
            if line.seq is not None:
                summary.with_seq += 1
                if log is not None:
                    note = _mismatch(line, next(iter(log.read(line.seq, line.seq)), None))
                    if note is not None:
                        summary.add_problem(line, note)
                        continue
            if line.level in ("warning", "error", "critical"):
                error = _exception_text(line.record)
                summary.add_problem(line, f"{line.level}: {line.message}" + (f" ({error})" if error else ""))
    finally:
        if log is not None:
            log.close()
    return summary


def _exception_text(record: dict[str, Any]) -> str | None:
    """``RuntimeError: the app broke`` from a structlog ``exception`` field (text or dict_tracebacks)."""
    exception = record.get("exception")
    if isinstance(exception, str):
        return exception.strip().splitlines()[-1] if exception.strip() else None
    if isinstance(exception, list) and exception and isinstance(exception[-1], dict):
        last = exception[-1]
        return f"{last.get('exc_type', 'Exception')}: {last.get('exc_value', '')}".rstrip(": ")
    return None


def exception_text(record: dict[str, Any] | None) -> str | None:
    return _exception_text(record) if record else None
