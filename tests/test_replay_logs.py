"""replay logs: the server's JSON log lines of a crash and restart, joined to the events by seq."""

from __future__ import annotations

import importlib
import os
import threading

import orjson

import replay
from events import EventStore
from lobby.cli import main

from .factories import Events
from .replay_logs import crash_log  # noqa: F401 - fixture


def test_what_the_server_logged_around_a_seq(crash_log, capsys):
    db, logfile = crash_log
    crashed, restarted = replay.sessions(db)
    restart = restarted.first_seq
    entries = list(replay.logs(logfile, db, around_seq=restart, window=2))
    events = [e for e in entries if e.kind == "event"]
    assert [e.seq for e in events] == list(range(restart - 2, restart + 3))
    lines = [e for e in entries if e.kind == "log"]
    # every event of the window has its line, right after it (but the listen event's: "listening" follows the
    # recovery's lines); the restart's "listening" line has no seq
    for event in events:
        following = entries[entries.index(event) + 1]
        assert following.kind == "log" and following.seq == event.seq and following.note is None
        assert following.line.message == event.event.type
    listening = [e for e in lines if e.seq is None]
    # and what it logged right after the window's last event (its recovery), before any other event
    assert [e.line.message for e in listening] == [
        "listening", "previous session ended without a close", "serving until a stop signal"]
    assert entries.index(listening[2]) == len(entries) - 1
    assert listening[0].line.record["recovering"] is True
    recovered = [e for e in lines if e.line.record.get("reason") == "recovered"]
    assert [e.event.username for e in recovered] == ["alice", "bob"]
    # logged once the listen event and the recovery are in the log
    assert entries.index(listening[0]) > max(entries.index(events[2]), *map(entries.index, recovered))
    assert main(["replay", "logs", str(logfile), "--db", str(db), "--around-seq", str(restart), "--window", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  event ") and any(line.startswith("> event ") and "listen" in line for line in out)
    assert any("listening" in line and "recovering=true" in line for line in out)
    assert main(["replay", "logs", str(logfile), "--db", str(db), "--around-seq", str(restart), "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["kind"] for row in rows} == {"event", "log"}
    assert all(row["event_type"] == row["event"] for row in rows if row["kind"] == "log" and row.get("seq"))


def test_lines_filtered_by_session_level_and_user(crash_log):
    db, logfile = crash_log
    crashed, restarted = replay.sessions(db)
    bob = list(replay.logs(logfile, db, session=crashed.session, username="bob"))
    assert [(e.line.message, e.event.type) for e in bob] == [("join", "join"), ("link", "link"),
                                                             ("message", "message")]
    [warning] = replay.logs(logfile, db, level="warning")  # the restart after the crash
    assert warning.line.message == "previous session ended without a close"
    assert warning.line.record["session"] == restarted.session
    every = list(replay.logs(logfile, db))
    assert len(every) == sum(1 for line in logfile.read_bytes().splitlines() if line.strip())


def test_a_summary_counts_lines_and_flags_those_that_do_not_fit(crash_log, tmp_path, capsys):
    db, logfile = crash_log
    summary = replay.log_summary(logfile, db)
    assert summary.not_json == 0
    assert [note for _, note in summary.problems] == ["warning: previous session ended without a close"]
    assert summary.levels["debug"] == 3  # the three custom messages
    assert summary.messages["listening"] == 2 and summary.messages["link"] == 3
    # A log file of another run: its seqs name other events.
    foreign = tmp_path / "other.log"
    foreign.write_bytes(
        logfile.read_bytes()
        + b'{"event":"unlink","seq":3,"session":"zzz","username":"bob","level":"info","timestamp":"2026-11-27T21:03:00Z"}\n'
        + b'WARNING websockets.server: something in plain text\n'
        + b'{"event":"listener failed","seq":4,"level":"error","exception":[{"exc_type":"RuntimeError","exc_value":"the app broke"}],"timestamp":"2026-11-27T21:03:00Z"}\n'
        + b'{"event":"join","seq":999,"level":"info","timestamp":"2026-11-27T21:03:00Z"}\n'
    )
    summary = replay.log_summary(foreign, db)
    notes = [(line.seq, note) for line, note in summary.problems]
    assert summary.not_json == 1
    assert notes[0] == (None, "warning: previous session ended without a close")
    assert notes[1][0] == 3 and "is of session" in notes[1][1]
    # A line that is not JSON (a failed start's line in a JSON log, say) is listed, not only counted.
    assert notes[2] == (None, "not JSON: WARNING websockets.server: something in plain text")
    assert notes[3] == (4, "error: listener failed (RuntimeError: the app broke)")
    assert notes[4] == (999, "seq 999 is not in the event log (another log file, or a log cut short)")
    assert main(["replay", "logs", str(foreign), "--db", str(db), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "1 not JSON" in out and "RuntimeError: the app broke" in out and "something in plain text" in out
    # Read through a pipe too (a rotated, compressed log: <(zcat server.log.1.gz)).
    reader, writer = os.pipe()

    def feed() -> None:
        with os.fdopen(writer, "wb") as pipe:
            pipe.write(foreign.read_bytes())

    feeding = threading.Thread(target=feed)
    feeding.start()
    try:
        assert replay.log_summary(f"/dev/fd/{reader}", db).lines == summary.lines
    finally:
        feeding.join()
        os.close(reader)


def test_odd_lines_and_a_swapped_database_argument(crash_log, tmp_path, capsys):
    """A username that is not a string is shown, not a traceback; a seq of true is no seq; the event log given
    as the log file is refused by name; -s with --around-seq keeps to that session."""
    db, logfile = crash_log
    crashed, restarted = replay.sessions(db)
    odd = tmp_path / "odd.log"
    odd.write_bytes(
        b'{"event":123,"seq":5,"level":["x"],"timestamp":null,"username":5}\n'
        b'{"event":"hello","seq":true,"level":"info","timestamp":"2026-11-27T21:03:00Z"}\n'
        b'{"event":"far","level":"info","timestamp":"9999-12-31T23:59:59.999999-01:00"}\n'  # no UTC date
    )
    assert main(["replay", "logs", str(odd), "--db", str(db)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and "hello" in out[1] and out[1].split()[1] == "-"  # no seq
    assert [entry.seq for entry in replay.logs(odd, db)] == [5, None, None]
    assert [entry.at for entry in replay.logs(odd, db)][2] is None and "far" in out[2]
    assert main(["replay", "logs", str(db), "--db", str(db)]) == 2
    assert capsys.readouterr().err == (
        f"lobby replay logs: {db}: is an SQLite database, not a server log file (the event log goes in --db)\n"
    )
    entries = list(replay.logs(logfile, db, around_seq=restarted.first_seq, window=3, session=restarted.session))
    assert entries and all(entry.seq is None or entry.seq >= restarted.first_seq for entry in entries)
    assert main(["replay", "logs", str(logfile), "--db", str(db), "--around-seq", str(restarted.first_seq),
                 "-s", crashed.session]) == 2
    assert "is not in session" in capsys.readouterr().err


def test_a_summary_lists_the_first_problems_and_counts_the_rest(crash_log, tmp_path, monkeypatch):
    db, _ = crash_log
    monkeypatch.setattr(importlib.import_module("replay.logs"), "MAX_PROBLEMS", 3)
    many = tmp_path / "many.log"
    many.write_bytes(b'{"event":"join","seq":999,"level":"info"}\n' * 10)
    summary = replay.log_summary(many, db)
    assert (len(summary.problems), summary.more_problems) == (3, 7)


def test_a_line_without_seq_between_lines_of_the_window_is_shown_whatever_its_time(tmp_path):
    """While the clock is stepped back, events hold the last recorded time and log lines do not: a line
    without seq written between two lines of the window (a rejected link) is shown after the line before
    it, not dropped for its time."""
    ev = Events()
    db = tmp_path / "held.db"
    with EventStore(db) as store:
        store.append([ev.listen(), ev.join("al"), ev.link("al"), ev.unlink("al"), ev.close()])
    later = "2030-01-01T00:00:00Z"  # the log's own clock, far from the events' held times
    lines = [{"event": kind, "seq": seq, "session": "s1", "level": "info", "timestamp": later}
             for seq, kind in ((2, "join"), (3, "link"), (4, "unlink"))]
    rejected = {"event": "link rejected", "session": "s1", "level": "info", "timestamp": later, "username": "bo"}
    logfile = tmp_path / "server.log"
    logfile.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in [*lines[:2], rejected, lines[2]]))
    entries = list(replay.logs(logfile, db, around_seq=3, window=1))
    assert [(entry.kind, entry.seq, entry.line.message if entry.line else None) for entry in entries] == [
        ("event", 2, None), ("log", 2, "join"), ("event", 3, None), ("log", 3, "link"),
        ("log", None, "link rejected"), ("event", 4, None), ("log", 4, "unlink"),
    ]


def test_lines_without_seq_next_to_the_window_are_shown_with_it(tmp_path):
    """A cut-off's warning is logged before its event is committed, and a close logs after its event: with
    --window 0 (or any window, for a rate limit) they were left out, their times outside the window's."""
    ev = Events()
    db = tmp_path / "edges.db"
    with EventStore(db) as store:
        store.append([ev.listen(), ev.join("al"), ev.link("al"), ev.unlink("al", "rate limit"), ev.close()])
    earlier, later = "2023-11-14T22:13:20Z", "2030-01-01T00:00:00Z"  # both outside the events' times

    def line(event: str, seq: int | None = None, timestamp: str = later) -> dict:
        return {"event": event, "session": "s1", "level": "info", "timestamp": timestamp,
                **({"seq": seq} if seq is not None else {})}

    logfile = tmp_path / "server.log"
    logfile.write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in [
        line("listening", timestamp=earlier), line("listen", 1), line("join", 2), line("link", 3),
        line("cut off", timestamp=earlier), line("unlink", 4), line("close", 5), line("closed"),
    ]))

    def around(seq: int) -> list:
        return [(e.kind, e.seq, e.line.message if e.line else None) for e in replay.logs(logfile, db, around_seq=seq, window=0)]

    assert around(4) == [("log", None, "cut off"), ("event", 4, None), ("log", 4, "unlink")]
    assert around(5) == [("event", 5, None), ("log", 5, "close"), ("log", None, "closed")]
    # Between the lines of two events, it is next to both windows.
    assert around(3) == [("event", 3, None), ("log", 3, "link"), ("log", None, "cut off")]
    assert around(2) == [("event", 2, None), ("log", 2, "join")]
    assert around(1) == [("log", None, "listening"), ("event", 1, None), ("log", 1, "listen")]


def test_a_line_without_seq_in_a_window_whose_events_have_no_lines_is_shown_by_its_time(tmp_path):
    """An info log has no lines for custom messages: around one, a rejected link logged meanwhile was shown by
    its time, then dropped for a while (no line of the window to stand next to)."""
    import datetime

    ev = Events()
    events = [ev.listen(), ev.join("al"), ev.link("al"), *(ev.message("al", {"type": "chat"}) for _ in range(3)),
              ev.unlink("al"), ev.close()]
    db = tmp_path / "quiet.db"
    with EventStore(db) as store:
        store.append(events)

    def line(event: str, seq: int | None, at: int) -> dict:
        stamp = datetime.datetime.fromtimestamp(at / 1e6, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return {"event": event, "session": "s1", "level": "info", "timestamp": stamp, **({"seq": seq} if seq else {})}

    logfile = tmp_path / "server.log"
    logfile.write_bytes(b"".join(orjson.dumps(entry) + b"\n" for entry in [
        line("link", 3, events[2].at), line("link rejected", None, events[4].at), line("unlink", 7, events[6].at),
    ]))
    assert [(e.kind, e.seq, e.line.message if e.line else None) for e in replay.logs(logfile, db, around_seq=5, window=1)] == [
        ("event", 4, None), ("event", 5, None), ("log", None, "link rejected"), ("event", 6, None),
    ]


def test_lines_filtered_by_time(crash_log, capsys):
    """From a report's time to the log lines, without going through a seq first."""
    from replay.reader import iso_time

    db, logfile = crash_log
    crashed, restarted = replay.sessions(db)
    since, until = iso_time(crashed.start), iso_time(crashed.last_at)
    lines = list(replay.logs(logfile, db, since=since, until=until))
    assert lines and all(crashed.start <= entry.line.at <= crashed.last_at for entry in lines)
    every = [entry.line for entry in replay.logs(logfile, db)]
    assert len(lines) == sum(1 for line in every if line.at is not None and crashed.start <= line.at <= crashed.last_at)
    assert {entry.line.record.get("session") for entry in lines} == {crashed.session}
    assert main(["replay", "logs", str(logfile), "--db", str(db), "--around-seq", "3", "--since", since]) == 2
    assert "not both" in capsys.readouterr().err
