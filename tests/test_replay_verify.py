"""replay verify: every inconsistency reported with its seq, exit code 1 when anything is wrong."""

from __future__ import annotations

import os
import sqlite3

import orjson

import replay
from events import EventStore, rebuild
from lobby.cli import main

from .factories import Events
from .replay_logs import crash_log, game_log  # noqa: F401 - fixtures


def _write(path, events):
    with EventStore(path) as store:
        store.append(events)


def _kinds(report):
    return [(p.seq, p.kind) for p in report.problems]


def test_a_clean_log_from_real_sessions_verifies(game_log, capsys):
    report = replay.verify(game_log)
    assert report.ok and report.problems == []
    assert report.events == report.last_seq == 34 and report.sessions == 2
    assert main(["replay", "verify", str(game_log)]) == 0
    assert capsys.readouterr().out.strip().endswith("last seq 34: OK")


def test_a_crash_is_a_session_that_never_closed_and_its_recovery_matches(crash_log, capsys):
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    report = replay.verify(db)
    assert _kinds(report) == [(crashed.last_seq, "never-closed")]
    assert f"restarted as session {restarted.session}" in report.problems[0].message
    assert main(["replay", "verify", str(db)]) == 1
    out = capsys.readouterr().out
    assert "never-closed" in out and "1 problem" in out


def test_every_kind_of_inconsistency_is_reported_with_its_seq(tmp_path):
    ev = Events()
    events = [
        ev.listen(),            # 1
        ev.join("alice"),       # 2
        ev.link("bob"),         # 3 link without a join
        ev.link("alice"),       # 4
        ev.leave("alice"),      # 5 leave while linked, no unlink before it
        ev.message("carol", {"type": "x/y"}),  # 6 message of an unknown user
        ev.join("dave"),        # 7
        ev.link("dave"),        # 8
    ]
    ev.session = "s2"
    events += [
        ev.listen(),            # 9: s1 never closed; bob and dave were linked
        ev.unlink("dave", "recovered"),  # 10: bob is not recovered
        ev.join("erin"),        # 11
        ev.unlink("erin", "recovered"),  # 12: recovered outside a recovery, and erin is not linked
        ev.close(),             # 13
    ]
    path = tmp_path / "bad.db"
    _write(path, events)
    report = replay.verify(path)
    assert _kinds(report) == [
        (3, "link-without-join"),
        (5, "leave-while-linked"),
        (6, "message-of-unknown-user"),
        (8, "never-closed"),
        (11, "recovery-mismatch"),
        (12, "recovery-mismatch"),
        (12, "unlink-while-unlinked"),
    ]  # bob counts as recovered once reported, so the close is fine
    messages = {p.seq: p.message for p in report.problems}
    assert "link of bob, who never joined" in messages[3]
    assert "leave of alice while linked, without an unlink before it" in messages[5]
    assert "not unlinked (still linked from the crashed session): bob" in messages[11]


def test_a_seq_gap_is_reported(tmp_path):
    ev = Events()
    path = tmp_path / "gap.db"
    _write(path, [ev.listen(), ev.join("alice"), ev.link("alice"), ev.unlink("alice"), ev.close()])
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE seq IN (2, 3)")
    report = replay.verify(path)
    assert (4, "seq-gap") in _kinds(report)
    assert "seqs 2..3 missing before seq 4" in report.problems[0].message
    # without the join and the link, the unlink cannot follow either
    assert (4, "unlink-of-unknown-user") in _kinds(report)


def test_verify_exits_1_for_a_broken_log_when_its_reader_went_away(crash_log, tmp_path, monkeypatch):
    """`verify | head` with pipefail: the reader gone, the exit code is still the verdict, not 0."""
    db, _ = crash_log

    class GoneReader:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return self.fd

    with open(tmp_path / "stdout", "w") as sink:
        monkeypatch.setattr("sys.stdout", GoneReader(os.dup(sink.fileno())))
        assert main(["replay", "verify", str(db)]) == 1
        assert main(["replay", "verify", str(db), "--json"]) == 1


def test_a_snapshot_or_a_sessions_row_that_is_not_the_fold_is_reported(tmp_path):
    """The derived data `state`, `sessions` and the next start trust: a snapshot with a ghost user, a sessions
    row cut short. Both were invisible to verify (while `state` answered from them)."""
    ev = Events()
    path = tmp_path / "lobby.db"
    events = [ev.listen(), ev.join("alice"), ev.link("alice"), ev.join("bob"), ev.message("alice", {"type": "a/b"}),
              ev.unlink("alice", "close"), ev.leave("alice", "close"), ev.leave("bob", "close"), ev.close()]
    with EventStore(path) as store:
        store.append(events)
        store.save_snapshot(rebuild(store.read(to_seq=4)))
    assert replay.verify(path).ok
    with sqlite3.connect(path) as damage:
        damage.execute("""UPDATE snapshots SET users = '[["alice",true],["bob",false],["ghost",false]]'""")
    assert _kinds(replay.verify(path)) == [(4, "bad-snapshot")]
    assert "3 users, 1 linked, against 2 and 1" in replay.verify(path).problems[0].message
    with sqlite3.connect(path) as damage:
        damage.execute("DELETE FROM snapshots")
        damage.execute("UPDATE sessions SET last_seq = 3")
    (problem,) = replay.verify(path).problems
    assert (problem.kind, problem.message) == (
        "bad-session-index", "the sessions table gives session s1 seqs 1..3, but its events are seqs 1..9"
    )


def test_a_lost_listen_is_reported_once_not_for_each_event_of_its_session(tmp_path):
    first, second = Events(), Events(session="s2", at=1_700_000_000_100_000)
    path = tmp_path / "lobby.db"
    _write(path, [first.listen(), first.join("al"), first.link("al"), first.unlink("al", "close"),
                  first.leave("al", "close"), first.close(), second.listen(), second.join("bo"), second.link("bo"),
                  *(second.message("bo", {"type": "x/y"}) for _ in range(20)), second.unlink("bo", "close"),
                  second.leave("bo", "close"), second.close()])
    with sqlite3.connect(path) as damage:
        damage.execute("DELETE FROM events WHERE seq = 7")  # the listen of s2
    assert _kinds(replay.verify(path)) == [(8, "seq-gap"), (8, "other-session"), (7, "bad-session-index")]


def test_a_stray_row_or_an_event_after_close_is_one_problem(tmp_path):
    """A row of the next session in the middle of this one (a damaged sid) is not a lost listen: the fold
    stays with this session; an event after a clean close does not reopen it (no "never-closed" then)."""
    a, b = Events(), Events(session="s2", at=1_700_000_000_100_000)
    path = tmp_path / "stray.db"
    _write(path, [a.listen(), a.join("al"), a.link("al"), *(a.message("al", {"type": "x/y"}) for _ in range(20)),
                  a.unlink("al", "close"), a.leave("al", "close"), a.close(), b.listen(), b.close()])
    with sqlite3.connect(path) as damage:
        damage.execute("UPDATE events SET sid = 2 WHERE seq = 5")
    assert [kind for _, kind in _kinds(replay.verify(path))] == ["other-session", "bad-session-index"]
    ev = Events()
    path = tmp_path / "after_close.db"
    _write(path, [ev.listen(), ev.join("al"), ev.link("al"), ev.unlink("al", "close"), ev.leave("al", "close"),
                  ev.close(), ev.join("bob"), ev.link("bob"), *(ev.message("bob", {"type": "x/y"}) for _ in range(10))])
    assert _kinds(replay.verify(path)) == [(7, "after-close")]  # once for the session, not at each event


def test_snapshots_after_a_crash_are_checked_and_one_that_does_not_read_is_reported(tmp_path, capsys):
    """A crash is reported (never-closed) but its recovery leaves the fold exact: later snapshots are still
    compared. A snapshot that cannot be read was a traceback."""
    a, b = Events(), Events(session="s2", at=1_700_000_000_100_000)
    path = tmp_path / "crash.db"
    with EventStore(path) as store:
        store.append([a.listen(), a.join("al"), a.link("al"), b.listen(), b.unlink("al", "recovered"),
                      b.join("bob"), b.leave("bob", "close"), b.leave("al", "close"), b.close()])
        store.save_snapshot(rebuild(store.read(to_seq=6)))
    assert _kinds(replay.verify(path)) == [(3, "never-closed")]
    with sqlite3.connect(path) as damage:
        damage.execute("""UPDATE snapshots SET users = '[["al",false],["bob",false],["ghost",false]]'""")
    assert _kinds(replay.verify(path)) == [(3, "never-closed"), (6, "bad-snapshot")]
    with sqlite3.connect(path) as damage:
        damage.execute("UPDATE snapshots SET users = 'not json'")
    assert main(["replay", "verify", str(path)]) == 1
    [line] = [line for line in capsys.readouterr().out.splitlines() if "bad-snapshot" in line]
    assert line.startswith("seq       6") and "the registry snapshot of 'main' at seq 6 does not read: " in line
    # Derived data: state and a server's start pass over it (to an earlier snapshot, or the log's start).
    assert replay.state(path, at_seq=6).registry.users == {"al": False, "bob": False}
    assert main(["replay", "state", str(path), "--at-seq", "6"]) == 0


async def test_a_server_starts_past_a_snapshot_that_does_not_read(tmp_path):
    """A traceback and exit 1 before: the snapshot is derived data, the log holds the same registry."""
    from structlog.testing import capture_logs

    from lobby import Server

    a = Events()
    path = tmp_path / "lobby.db"
    with EventStore(path) as store:
        store.append([a.listen(), a.join("al"), a.link("al"), a.join("bob")])
        store.save_snapshot(rebuild(store.read()))
        store.append([a.unlink("al", "requested")])
        store.save_snapshot(rebuild(store.read()))
    with sqlite3.connect(path) as damage:
        damage.execute("UPDATE snapshots SET users = x'00ff' WHERE seq = 5")
    server = Server(port=0, db=str(path), ping_interval=None)
    with capture_logs() as logs:
        await server.start()
    try:
        assert server.users == [{"username": "al", "isLinked": False}, {"username": "bob", "isLinked": False}]
        [warning] = [line for line in logs if line["event"] == "registry snapshot passed over"]
        assert (warning["log_level"], warning["seq"]) == ("warning", 5)
    finally:
        await server.close()


def test_a_session_the_sessions_table_no_longer_covers_is_reported(tmp_path):
    a, b = Events(), Events(session="s2", at=1_700_000_000_100_000)
    path = tmp_path / "hidden.db"
    _write(path, [a.listen(), a.join("al"), a.link("al"), a.unlink("al", "close"), a.leave("al", "close"), a.close(),
                  b.listen(), b.join("bo"), b.leave("bo", "close"), b.close()])
    with sqlite3.connect(path) as damage:
        damage.execute("UPDATE sessions SET first_seq = 8, last_seq = 9 WHERE session = 's1'")
    assert [s.session for s in replay.sessions(path)] == ["s2"]  # what every command then sees
    (problem,) = replay.verify(path).problems
    assert (problem.seq, problem.kind, problem.session) == (1, "bad-session-index", "s1")
    assert "has events (seqs 1..6) that the sessions table does not cover" in problem.message


def test_live_takes_the_last_open_session_as_running(tmp_path, capsys):
    ev = Events()
    path = tmp_path / "live.db"
    _write(path, [ev.listen(), ev.join("alice"), ev.link("alice")])
    assert _kinds(replay.verify(path)) == [(3, "never-closed")]
    live = replay.verify(path, live=True)
    assert live.ok and live.running == ["main/s1"]
    assert main(["replay", "verify", str(path), "--live", "--json"]) == 0
    (summary,) = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary == {"kind": "summary", "path": str(path), "ok": True, "events": 3, "last_seq": 3,
                       "sessions": 1, "running": ["main/s1"], "problems": 0}
    assert main(["replay", "verify", str(path), "--json"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ('{"seq":3,"kind":"never-closed","lobby":"main","session":"s1","message":'
                        + lines[0].split('"message":', 1)[1])
    assert orjson.loads(lines[1]) == {"kind": "summary", "path": str(path), "ok": False, "events": 3,
                                      "last_seq": 3, "sessions": 1, "running": [], "problems": 1}


def test_time_going_back_within_a_lobby_is_reported_once_where_it_steps(tmp_path):
    """A log written while the clock stepped back (by a version that did not hold times) breaks time
    queries: verify says where. Another lobby's clock is its own."""
    ev, other = Events(), Events(lobby="other", at=1_000)
    events = [ev.listen(), ev.join("alice"), other.listen()]
    ev.at -= 600_000_000
    events += [ev.link("alice"), ev.unlink("alice"), ev.close(), other.close()]
    path = tmp_path / "clock.db"
    _write(path, events)
    report = replay.verify(path)
    assert _kinds(report) == [(4, "time-goes-back")]
    assert "is before" in report.problems[0].message and "of seq 2" in report.problems[0].message


def test_a_single_missing_seq_is_named_as_one_seq(tmp_path):
    """A gap of one event reads "seq 3 missing", not a range "seqs 3..3"."""
    ev = Events()
    path = tmp_path / "gap.db"
    _write(path, [ev.listen(), ev.join("alice"), ev.message("alice", {"type": "x/y"}), ev.close()])
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 3")
    report = replay.verify(path)
    assert _kinds(report) == [(4, "seq-gap")]
    assert "seq gap: seq 3 missing before seq 4" in report.problems[0].message


def test_time_going_back_by_less_than_a_second_is_reported(tmp_path):
    """Time queries break on any step back, however small (an NTP correction of a quarter second)."""
    ev = Events()
    events = [ev.listen(), ev.join("alice")]
    ev.at -= 250_000
    events += [ev.link("alice"), ev.unlink("alice"), ev.close()]
    path = tmp_path / "clock.db"
    _write(path, events)
    report = replay.verify(path)
    assert _kinds(report) == [(3, "time-goes-back")]
    assert "of seq 2" in report.problems[0].message


def test_a_recovery_in_another_order_than_join_order_is_reported(tmp_path):
    """A restart recovers the linked users in join order; the same users in another order is a mismatch."""
    ev = Events()
    events = [ev.listen(), ev.join("alice"), ev.join("bob"), ev.link("alice"), ev.link("bob")]
    ev.session = "s2"
    events += [
        ev.listen(),                     # 6: s1 never closed; alice and bob were linked
        ev.unlink("bob", "recovered"),   # 7
        ev.unlink("alice", "recovered"),  # 8
        ev.leave("alice"),               # 9: ends the recovery
        ev.leave("bob"),
        ev.close(),
    ]
    path = tmp_path / "order.db"
    _write(path, events)
    report = replay.verify(path)
    assert _kinds(report) == [(5, "never-closed"), (9, "recovery-mismatch")]
    assert ("does not match: unlinked in the order bob, alice instead of join order alice, bob"
            in report.problems[1].message)


def test_a_recovered_unlink_of_another_session_is_not_the_recovery(tmp_path):
    """The recovery unlinks belong to the restarted session; one tagged with the crashed session's id does
    not recover the user, so the recovery is reported as incomplete."""
    ev = Events()
    events = [ev.listen(), ev.join("alice"), ev.link("alice")]
    ev.session = "s2"
    events += [ev.listen()]                   # 4: s1 never closed; alice was linked
    ev.session = "s1"
    events += [ev.unlink("alice", "recovered")]  # 5: written under the crashed session
    ev.session = "s2"
    events += [ev.close()]
    path = tmp_path / "stray.db"
    _write(path, events)
    report = replay.verify(path)
    assert _kinds(report) == [(3, "never-closed"), (5, "recovery-mismatch"), (5, "recovery-mismatch"),
                              (5, "other-session")]
    assert "not unlinked (still linked from the crashed session): alice" in report.problems[1].message
    assert "no crashed session is being recovered here" in report.problems[2].message
