"""``lobby replay ...`` (and ``python -m replay ...``): the replay commands on the command line.

Every command opens the log read-only (it may be running), prints tables for people or JSON lines with
``--json``, and answers a missing file, a foreign database, an unknown session or a bad argument with one
line on stderr and exit code 2. ``verify`` and ``redrive`` exit 1 when they find something wrong.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import math
import os
import sqlite3
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from events import EVENT_TYPES, EventLogError, InconsistentEvent

from .export import export as export_events
from .html import html
from .logs import LEVELS, Entry, exception_text, log_summary, logs
from .reader import ReplayError, check_output, format_duration, format_time
from .redrive import check_new_log, redrive
from .render import dumps, event_json, event_row, registry_line, table_header
from .sessions import sessions
from .state import diff, state, step
from .stats import stats
from .timeline import timeline
from .verify import VerifyReport, verify

__all__ = ["Parser", "add_replay_commands", "main"]

Command = Callable[[argparse.Namespace], int]


def _guarded(name: str, command: Command) -> Command:
    """Run ``command``; a problem of the input becomes one line on stderr and exit code 2."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        name_used = getattr(args, "replay_command", None) or name  # an alias as typed (show)
        try:
            return command(args)
        except (EventLogError, ReplayError) as error:
            return _fail(name_used, str(error))
        except InconsistentEvent as error:
            return _fail(name_used, f"the log does not fold at {error} ('lobby replay verify' lists every problem)")
        except sqlite3.DatabaseError as error:  # a page that does not read: the file is damaged
            db = getattr(args, "db", "the log")
            return _fail(name_used, f"{db}: cannot be read: {error} (`sqlite3 {db} .recover` copies out what can be)")
        except BrokenPipeError:
            # The reader went away (| head): stop quietly, like other command line tools.
            _stdout_gone()
            return 0
        except OSError as error:
            return _fail(name_used, f"{error.filename or ''}: {error.strerror or error}".lstrip(": "))

    return run


def _fail(name: str, message: str) -> int:
    print(f"lobby replay {name}: {message}", file=sys.stderr)
    return 2


def _out(line: str = "") -> None:
    """A line for people: control and direction characters (in a username an app's own rule allows, a
    reason, a message) are shown escaped, so that no value can start a line or a row of its own."""
    sys.stdout.write(line.translate(_ESCAPED) + "\n")


#: C0 and C1 controls, DEL, line and paragraph separators, bidirectional overrides and isolates.
_ESCAPED = {
    code: repr(chr(code))[1:-1] if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}


def _json_line(value: Any) -> None:
    sys.stdout.write(dumps(value) + "\n")


# -- the commands -----------------------------------------------------------------------------------------


def _sessions(args: argparse.Namespace) -> int:
    found = sessions(args.db, lobby=args.lobby)
    if args.json:
        for summary in found:
            _json_line(summary.to_dict())
        return 0
    if not found:
        _out("(no sessions)")
        return 0
    _out(f"{'lobby':<10} {'session':<14} {'start (UTC)':<23}  {'end':<33}  {'duration':>9} {'users':>5} "
         f"{'events':>7}  counts")
    for s in found:
        end = format_time(s.end) if s.end is not None else s.status
        if s.status == "closed for a restart":
            end += " (restart)"
        counts = ", ".join(f"{kind} {count}" for kind, count in s.counts.items())
        _out(f"{s.lobby:<10} {s.session:<14} {format_time(s.start):<23}  {end:<33}  "
             f"{format_duration(s.duration):>9} {s.users:>5} {s.events:>7}  {counts}")
    return 0


def _timeline(args: argparse.Namespace) -> int:
    events = timeline(
        args.db, args.session, lobby=args.lobby, users=args.user, types=args.type, since=args.since,
        until=args.until, from_seq=args.from_seq, to_seq=args.to_seq, seen_by=args.seen_by,
    )
    if args.json:
        for event in events:
            _json_line(event_json(event))
        return 0
    width = 6
    multiple = args.session is None
    _out(table_header(seq_width=width, with_session=multiple))
    shown = 0
    for event in events:
        _out(event_row(event, seq_width=width, with_session=multiple))
        shown += 1
    if not shown:
        _out("(no events match)")
    return 0


def _state(args: argparse.Namespace) -> int:
    point = state(args.db, lobby=args.lobby, session=args.session, at_seq=args.at_seq, at_time=args.at_time)
    if args.json:
        _json_line(point.to_dict())
        return 0
    registry = point.registry
    when = format_time(point.at) if point.at is not None else "before the first event"
    status = "" if registry.session is None else f", session {registry.session}" + (" (closed)" if registry.closed else "")
    _out(f"lobby {point.lobby}{status}, after seq {point.seq} ({when})")
    for name, linked in registry.users.items():
        _out(f"  {'●' if linked else '○'} {name:<24} {'linked' if linked else 'unlinked'}")
    _out(f"{len(registry.users)} users, {len(registry.linked())} linked")
    if point.died_until is not None:
        _out(f"the session ended here without a close (the server died); the next began at "
             f"{format_time(point.died_until)} and unlinked the linked users (recovered)")
    return 0


def _diff(args: argparse.Namespace) -> int:
    result = diff(args.db, lobby=args.lobby, session=args.session, from_seq=args.from_seq, to_seq=args.to_seq,
                  from_time=args.from_time, to_time=args.to_time)
    if args.json:
        _json_line(result.to_dict())
        return 0
    before, after = result.before, result.after
    _out(f"lobby {before.lobby}: after seq {before.seq} ({format_time(before.at)}) -> after seq {after.seq} "
         f"({format_time(after.at)})")
    for label, names in (("joined", result.joined), ("left", result.left), ("linked", result.linked),
                         ("unlinked", result.unlinked)):
        _out(f"  {label + ':':<10}{', '.join(names) if names else '-'}")
    for label, names, how in (("rejoined", result.rejoined, "left and joined again"),
                              ("relinked", result.relinked, "unlinked and linked again")):
        if names:
            _out(f"  {label + ':':<10}{', '.join(names)} ({how})")
    _out(f"  {'before:':<10}{registry_line(before.registry)}")
    _out(f"  {'after:':<10}{registry_line(after.registry)}")
    return 0


def _step(args: argparse.Namespace) -> int:
    pause = args.pause if args.pause is not None else (sys.stdin.isatty() and sys.stdout.isatty())
    walk = step(args.db, args.session, lobby=args.lobby, from_seq=args.from_seq, to_seq=args.to_seq)
    if pause:
        _out("Enter: next event; c, Enter: continue to the end; q, Enter: quit")
    walked = False
    for event, registry in walk:
        walked = True
        _out(event_row(event))
        _out(f"{'':>8}users: {registry_line(registry)}")
        if pause:
            sys.stdout.write("> ")
            sys.stdout.flush()
            answer = sys.stdin.readline()
            if not answer or answer.strip().lower() == "q":
                walk.close()  # type: ignore[attr-defined]
                break
            if answer.strip().lower() == "c":
                pause = False
    if not walked:
        _out("(no events match)")
    return 0


def _stdout_gone() -> None:
    """Send what is still to be written (at exit too) nowhere: the reader of stdout went away."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _verify(args: argparse.Namespace) -> int:
    report = verify(args.db, live=args.live)
    try:
        _print_report(args, report)
    except BrokenPipeError:  # `verify | head`: the verdict is the exit code still (a script checks it)
        _stdout_gone()
    return 0 if report.ok else 1


def _print_report(args: argparse.Namespace, report: VerifyReport) -> None:
    if args.json:
        for problem in report.problems:
            _json_line(problem.to_dict())
        summary = {**report.to_dict(), "kind": "summary", "problems": len(report.problems)}
        _json_line(summary)  # last line, also for a clean log
    else:
        for problem in report.problems:
            where = f"{problem.lobby}/{problem.session}" if problem.lobby else ""
            _out(f"seq {problem.seq:>7}  {problem.kind:<22} {where}  {problem.message}")
        for running in report.running:
            _out(f"note: session {running} has no close yet: taken as running (--live)")
        verdict = "OK" if report.ok else f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}"
        _out(f"{report.path}: {report.events} events, {report.sessions} sessions, last seq {report.last_seq}: {verdict}")


def _html(args: argparse.Namespace) -> int:
    output = args.output
    if output == "-":
        sys.stdout.write(html(args.db, args.session, lobby=args.lobby, axis=args.axis, max_rows=args.max_rows))
        return 0
    if output is None:
        from .reader import open_log

        with open_log(args.db) as log:
            output = f"session-{log.session(args.session, args.lobby).session}.html"
    html(args.db, args.session, lobby=args.lobby, output=output, axis=args.axis, max_rows=args.max_rows)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    report = stats(args.db, args.session, lobby=args.lobby)
    if args.json:
        _json_line(report.to_dict())
        return 0
    for result in report.sessions:
        data = result.to_dict()
        summary = result.summary
        _out(f"session {summary.session} (lobby {summary.lobby}): {format_time(summary.start)}, "
             f"{format_duration(summary.duration)}, {summary.status}, {summary.events} events")
        _out(f"  drops {data['drops']}{_counts(data['drop_reasons'])}; relink after a drop: {_timing(data['relink'])}"
             f"; never relinked {data['never_relinked']}")
        _out(f"  messages from users {sum(data['messages'].values())}{_counts(data['messages'])}")
        _out(f"  messages from the app {sum(data['sent'].values())}{_counts(data['sent'])}")
        _user_table(result.users.values())
        _out()
    if len(report.sessions) > 1:
        _out("every session:")
        _user_table(report.users.values())
    return 0


def _counts(counts: dict[str, int]) -> str:
    return f" ({', '.join(f'{key} {value}' for key, value in counts.items())})" if counts else ""


def _timing(timing: dict[str, Any]) -> str:
    if not timing["count"]:
        return "-"
    return f"median {timing['median_s']:.3f}s, max {timing['max_s']:.3f}s over {timing['count']}"


def _user_table(users: Any) -> None:
    _out(f"  {'user':<16} {'linked':>9} {'links':>5} {'drops':>5}  {'relink median/max':<19} {'left':<10} messages")
    for user in users:
        data = user.to_dict()
        relink = data["relink"]
        timing = f"{relink['median_s']:.3f}s/{relink['max_s']:.3f}s" if relink["count"] else "-"
        reasons = _counts(data["drop_reasons"])
        messages = ", ".join(f"{k} {v}" for k, v in data["messages"].items()) or "-"
        _out(f"  {user.username:<16} {format_duration(user.linked_us):>9} {user.links:>5} {data['drops']:>5}  "
             f"{timing:<19} {user.left or '-':<10} {messages}{reasons and '  drops:' + reasons}")


def _logs(args: argparse.Namespace) -> int:
    if args.summary:
        summary = log_summary(args.logfile, args.db)
        if args.json:
            _json_line(summary.to_dict())
            return 0
        _out(f"{args.logfile}: {summary.lines} lines ({summary.not_json} not JSON), {summary.with_seq} about an event")
        _out(f"  levels: {', '.join(f'{k} {v}' for k, v in summary.levels.items()) or '-'}")
        _out(f"  messages: {', '.join(f'{k} {v}' for k, v in summary.messages.most_common(12)) or '-'}")
        _out(f"  sessions: {', '.join(f'{k} {v}' for k, v in summary.sessions.items()) or '-'}")
        for line, note in summary.problems:
            seq = f"seq {line.seq}" if line.seq is not None else "no seq"
            _out(f"  line {line.number} ({seq}, {format_time(line.at)}): {note}")
        if summary.more_problems:
            _out(f"  ... and {summary.more_problems} more")
        return 0
    entries = logs(args.logfile, args.db, around_seq=args.around_seq, window=args.window, session=args.session,
                   level=args.level, username=args.user, since=args.since, until=args.until)
    if args.json:
        for entry in entries:
            _json_line(entry.to_dict())
        return 0
    shown = 0
    for entry in entries:
        _out(_entry_row(entry, marked=args.around_seq))
        shown += 1
    if not shown:
        _out("(no log lines match)")
    return 0


def _entry_row(entry: Entry, marked: int | None) -> str:
    pointer = ">" if marked is not None and entry.seq == marked and entry.kind == "event" else " "
    if entry.kind == "event":
        assert entry.event is not None
        return pointer + " event " + event_row(entry.event)
    line = entry.line
    assert line is not None
    seq = f"{entry.seq:>6}" if entry.seq is not None else f"{'-':>6}"
    fields = line.fields()
    error = exception_text(line.record)
    fields.pop("exception", None)
    text = " ".join(f"{key}={dumps(value) if not isinstance(value, str) else value}" for key, value in fields.items())
    who = line.username or ""
    parts = [f"  log   {seq}  {format_time(line.at)}  {line.level:<7} {line.message}", who, text]
    if error:
        parts.append(f"exception: {error}")
    if entry.note:
        parts.append(f"!! {entry.note}")
    return "  ".join(part for part in parts if part)


def _export(args: argparse.Namespace) -> int:
    output = None if args.output in (None, "-") else args.output
    count = export_events(args.db, output, session=args.session, lobby=args.lobby, users=args.user, types=args.type,
                          since=args.since, until=args.until, from_seq=args.from_seq, to_seq=args.to_seq,
                          seen_by=args.seen_by)
    if output is not None:
        print(f"wrote {count} events to {output}", file=sys.stderr)
    return 0


def load_server(spec: str | None) -> Any:
    """A fresh, unstarted server: ``module:attribute`` naming a ``lobby.Server`` (or a function making one),
    or a plain ``lobby.Server()``. ``lobby`` is imported here, only when redrive runs."""
    if spec is None:
        return importlib.import_module("lobby").Server()
    lobby_cli = importlib.import_module("lobby.cli")
    try:
        app = lobby_cli.load_app(spec, option="--app")
    except lobby_cli.UsageError as error:
        raise ReplayError(str(error)) from None
    if getattr(app, "status", "initializing") != "initializing":
        raise ReplayError(f"{spec} is already {app.status}; redrive needs a server that has not started")
    return app


def _quiet_server_logs(path: str | None) -> None:
    """The fresh server's structured logs go to ``path`` as JSON lines, or nowhere: stdout is the report's."""
    import structlog

    if path is None:
        def drop(*_: Any) -> Any:
            raise structlog.DropEvent

        structlog.configure(processors=[drop], cache_logger_on_first_use=False)
        return
    handle = open(path, "ab")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.dict_tracebacks,
                    structlog.processors.JSONRenderer(serializer=lambda v, **_: dumps(v).encode())],
        logger_factory=structlog.BytesLoggerFactory(handle),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )


def _redrive(args: argparse.Namespace) -> int:
    if not math.isfinite(args.settle) or args.settle <= 0:
        raise ReplayError(f"--settle must be a positive number of seconds, not {args.settle}")
    for output in (args.server_log, args.keep_db):
        if output is not None:
            check_output(args.db, output)
    if args.keep_db is not None:  # before the server log is opened (created) below
        check_new_log(args.keep_db)
        if args.server_log is not None and os.path.abspath(args.server_log) == os.path.abspath(args.keep_db):
            raise ReplayError("--server-log and --keep-db name the same file")
    server = load_server(args.app)
    _quiet_server_logs(args.server_log)
    report = redrive(args.db, server, args.session, lobby=args.lobby, settle=args.settle, auth=args.auth,
                     keep_db=args.keep_db)
    if args.json:
        _json_line(report.to_dict())
    else:
        _out(f"redrove session {report.session} (lobby {report.lobby}): {report.inputs} client inputs, "
             f"{report.old_events} events in the old log, {report.new_events} recorded by the new server")
        if report.divergence is None:
            _out("no difference: the new server recorded the same events")
        else:
            for line in report.divergence.lines():
                _out(line)
        if report.new_db:
            _out(f"the new server's event log: {report.new_db}")
    return 0 if report.ok else 1


# -- the parser -------------------------------------------------------------------------------------------


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number, 0 or more, not {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the whole usage, and it points to the
    help of the command it is about (argparse reports unknown arguments from the top-level parser)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_defaults(_parser=self)  # a subcommand's parser sets its own: the innermost one wins

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            getattr(parsed, "_parser", self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", metavar="LOG", help="the event log file (opened read-only)")


def _session(parser: argparse.ArgumentParser, help_text: str = "session id or a unique prefix of it") -> None:
    parser.add_argument("-s", "--session", help=help_text)
    parser.add_argument("--lobby", help="the lobby (needed only when the log has several)")


def _json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def _add(commands: Any, name: str, command: Command, help_text: str, description: str | None = None,
         aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=description or help_text, aliases=list(aliases))
    parser.set_defaults(run=_guarded(name, command))
    return parser


def _filters(p: argparse.ArgumentParser) -> None:
    """Which events: by user (or as one user's client saw them), type, time and seq (timeline, export)."""
    whose = p.add_mutually_exclusive_group()
    whose.add_argument("-u", "--user", action="append", help="only events of this user (repeatable)")
    whose.add_argument("--seen-by", metavar="USER", help="what USER's client was sent (every user's join, link, "
                       "unlink and leave, broadcasts, sends) while linked, and what it did")
    p.add_argument("-t", "--type", action="append",
                   help=f"only events of this type (repeatable): {', '.join(EVENT_TYPES)}")
    p.add_argument("--since", help="from this time: ISO 8601 (UTC unless a zone is given) or HH:MM[:SS] on the "
                   "date of the session or log that has it")
    p.add_argument("--until", help="up to this time (same forms as --since)")
    p.add_argument("--from-seq", type=_nonnegative, help="from this seq")
    p.add_argument("--to-seq", type=_nonnegative, help="up to this seq")


def _add_commands(commands: Any) -> None:
    p = _add(commands, "sessions", _sessions, "the sessions in a log",
             "The sessions in a log: lobby, session, start, end (or why there is none), duration, users seen, "
             "event counts by type.")
    _db(p)
    p.add_argument("--lobby", help="only this lobby")
    _json(p)

    p = _add(commands, "timeline", _timeline, "the events of a session in order (alias: show)",
             "The events of a session (or of the whole log without --session) in seq order, filtered.",
             aliases=("show",))
    _db(p)
    _session(p, "session id or prefix (default: the whole log)")
    _filters(p)
    _json(p)

    p = _add(commands, "state", _state, "the registry at a point",
             "The registry (users, linked or not) after --at-seq or at --at-time; without a point, at the end of "
             "the session (or of the log).")
    _db(p)
    _session(p, "session id or prefix: the point's session (its end by default; HH:MM times on its date)")
    p.add_argument("--at-seq", type=_nonnegative, help="after this seq (0: before the first event)")
    p.add_argument("--at-time", help="at this time: ISO 8601 or HH:MM[:SS]")
    _json(p)

    p = _add(commands, "diff", _diff, "who joined, left, linked and unlinked between two points",
             "Net changes of the registry between two points; by default the start and the end of the session "
             "(or of the log).")
    _db(p)
    _session(p)
    p.add_argument("--from-seq", type=_nonnegative, help="the first point: after this seq")
    p.add_argument("--to-seq", type=_nonnegative, help="the second point: after this seq")
    p.add_argument("--from-time", help="the first point: at this time")
    p.add_argument("--to-time", help="the second point: at this time")
    _json(p)

    p = _add(commands, "step", _step, "walk a session event by event, with the registry after each",
             "Walk a session (default: the last one) event by event, printing the registry after each. On a "
             "terminal it waits for Enter after each event (c: continue, q: quit).")
    _db(p)
    _session(p, "session id or prefix (default: the last session)")
    p.add_argument("--from-seq", type=_nonnegative, help="start at this seq")
    p.add_argument("--to-seq", type=_nonnegative, help="stop after this seq")
    pause = p.add_mutually_exclusive_group()
    pause.add_argument("--pause", dest="pause", action="store_true", default=None, help="wait after each event")
    pause.add_argument("--no-pause", dest="pause", action="store_false", help="print every step at once")

    p = _add(commands, "verify", _verify, "fold the whole log and report every inconsistency (exit 1 if any)",
             "Fold the whole log and report every inconsistency with its seq: links without joins, leaves while "
             "linked, seq gaps, sessions that never closed, recoveries that do not match. Exit code 1 when "
             "anything is wrong.")
    _db(p)
    p.add_argument("--live", action="store_true", help="the server is running: the last session of each lobby "
                   "may have no close yet")
    _json(p)

    p = _add(commands, "html", _html, "a self-contained HTML page of a session (swimlanes and events)",
             "Write one self-contained HTML file for a session: a swimlane per user (joined, linked, unlinked, "
             "left, with reasons), message marks, and the event table.")
    _db(p)
    _session(p, "session id or prefix (default: the last session)")
    p.add_argument("-o", "--output", help="the HTML file (default: session-<id>.html; - for stdout)")
    p.add_argument("--axis", choices=("auto", "time", "seq"), default="auto",
                   help="x axis: time, seq, or auto (time unless every event has the same time)")
    p.add_argument("--max-rows", type=_nonnegative, default=20_000, help="events in the table at most (default "
                   "20000; the lanes always show the whole session)")

    p = _add(commands, "stats", _stats, "summaries per session and per user",
             "Per session and per user: time linked, links, drops and their reasons, time to relink after a "
             "drop, messages per type.")
    _db(p)
    _session(p, "session id or prefix (default: every session)")
    _json(p)

    p = _add(commands, "logs", _logs, "the server's JSON log lines joined to the events by seq",
             "Read the server's JSON log lines and join them to the events of the log by seq: --around-seq N "
             "shows what the server logged around seq N; --summary counts lines and lists warnings, errors "
             "and lines that do not fit the event log.")
    p.add_argument("logfile", metavar="LOGFILE", help="the server's log (JSON lines, as lobby serve writes them)")
    p.add_argument("--db", required=True, help="the event log file")
    p.add_argument("--around-seq", type=_nonnegative, help="the events around this seq with their log lines")
    p.add_argument("--window", type=_nonnegative, default=10, help="events on each side of --around-seq (default 10)")
    p.add_argument("-s", "--session", help="only lines of this session")
    p.add_argument("--level", choices=LEVELS, help="only lines at this level or above")
    p.add_argument("-u", "--user", help="only lines about this user")
    p.add_argument("--since", help="only lines logged from this time (as for timeline)")
    p.add_argument("--until", help="only lines logged up to this time (as for timeline)")
    p.add_argument("--summary", action="store_true", help="counts and problems instead of the lines")
    _json(p)

    p = _add(commands, "export", _export, "a session or a seq range as JSON lines",
             "Export a session, a seq range or the whole log as JSON lines (one event per line).")
    _db(p)
    _session(p, "session id or prefix (default: the whole log)")
    _filters(p)
    p.add_argument("-o", "--output", help="the file to write (default: stdout)")

    p = _add(commands, "redrive", _redrive, "replay a session's client inputs against a fresh server (exit 1 if "
             "it records something else)",
             "Send a session's recorded client inputs, in order, to a fresh server built from the current code "
             "with --app, and report the first point where what it records differs from the old log. Auth "
             "strings are never logged: links that had one send --auth instead.")
    _db(p)
    _session(p, "session id or prefix (default: the last session)")
    p.add_argument("--app", help="module:attribute of the app (a lobby.Server, or a function making one); "
                   "default: a plain lobby")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait for the server to record what an "
                   "input causes (default 2)")
    p.add_argument("--auth", default="redrive", help="the auth string sent for links that had one (default: redrive)")
    p.add_argument("--keep-db", help="keep the new server's log at this path (it must not exist)")
    p.add_argument("--server-log", help="write the new server's JSON log lines to this file")
    _json(p)


def add_replay_commands(subparsers: Any) -> None:
    """Add ``replay`` and its commands to the ``lobby`` command's subparsers."""
    replay = subparsers.add_parser(
        "replay", help="offline tools over an event log",
        description="Offline tools over an event log: sessions, timeline, state, diff, step, verify, html, "
        "stats, logs, export, redrive. Logs are opened read-only and may be written by a running server.",
    )
    commands = replay.add_subparsers(dest="replay_command", metavar="COMMAND")
    _add_commands(commands)
    replay.set_defaults(run=lambda args: _usage(replay))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m replay COMMAND ...``: the same commands as ``lobby replay``."""
    parser = Parser(prog="python -m replay", description="Offline tools over krmx-lobby event logs.")
    commands = parser.add_subparsers(dest="replay_command", metavar="COMMAND")
    _add_commands(commands)
    args = parser.parse_args(argv)
    if args.replay_command is None:
        return _usage(parser)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130
