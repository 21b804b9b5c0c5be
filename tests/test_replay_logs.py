"""replay logs: the server's JSON log lines of a crash and restart, joined to the events by seq."""

from __future__ import annotations

import orjson

import replay
from lobby.cli import main

from .replay_logs import crash_log  # noqa: F401 - fixture


def test_what_the_server_logged_around_a_seq(crash_log, capsys):
    db, logfile = crash_log
    crashed, restarted = replay.sessions(db)
    restart = restarted.first_seq
    entries = replay.logs(logfile, db, around_seq=restart, window=2)
    events = [e for e in entries if e.kind == "event"]
    assert [e.seq for e in events] == list(range(restart - 2, restart + 3))
    lines = [e for e in entries if e.kind == "log"]
    # every event of the window has its line, right after it; the restart's "listening" line has no seq
    for event in events:
        following = entries[entries.index(event) + 1]
        assert following.kind == "log" and following.seq == event.seq and following.note is None
        assert following.line.message == event.event.type
    listening = [e for e in lines if e.seq is None]
    assert [e.line.message for e in listening] == ["listening"]
    assert listening[0].line.record["recovering"] is True
    assert entries.index(listening[0]) < entries.index(events[2])  # logged before the listen event
    recovered = [e for e in lines if e.line.record.get("reason") == "recovered"]
    assert [e.event.username for e in recovered] == ["alice", "bob"]
    assert main(["replay", "logs", str(logfile), "--db", str(db), "--around-seq", str(restart), "--window", "1"]) == 0
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
    bob = replay.logs(logfile, db, session=crashed.session, username="bob")
    assert [(e.line.message, e.event.type) for e in bob] == [("join", "join"), ("link", "link"),
                                                             ("message", "message")]
    assert replay.logs(logfile, db, level="warning") == []
    every = replay.logs(logfile, db)
    assert len(every) == sum(1 for line in logfile.read_bytes().splitlines() if line.strip())


def test_a_summary_counts_lines_and_flags_those_that_do_not_fit(crash_log, tmp_path, capsys):
    db, logfile = crash_log
    summary = replay.log_summary(logfile, db)
    assert summary.not_json == 0 and summary.problems == []
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
    assert notes[0][0] == 3 and "is of session" in notes[0][1]
    assert notes[1] == (4, "error: listener failed (RuntimeError: the app broke)")
    assert notes[2] == (999, "seq 999 is not in the event log (another log file, or a log cut short)")
    assert main(["replay", "logs", str(foreign), "--db", str(db), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "1 not JSON" in out and "RuntimeError: the app broke" in out
