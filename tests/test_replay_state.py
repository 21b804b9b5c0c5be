"""replay state / diff / step: the registry at any point equals a full fold of the log, by seq or by time,
from snapshots, from the sidecar index or from nothing; the log file is never written."""

from __future__ import annotations

import hashlib
from datetime import datetime
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import replay
from lobby.cli import main
from events import EventStore, rebuild
from replay import index as replay_index
from replay.reader import ReplayError, open_log, parse_time

from .factories import Events
from .replay_logs import START, crash_log, game_log, us  # noqa: F401 - fixtures
from .test_projection import histories


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@settings(max_examples=40, deadline=None)
@given(histories(), st.data(), st.sampled_from(["none", "sparse", "every"]))
def test_state_at_any_seq_equals_a_full_fold(monkeypatch_index, history, data, snapshots):
    """Whatever snapshots the log has, and whether the sidecar exists yet, state == rebuild(events[:seq])."""
    events, _ = history
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lobby.db"
        with EventStore(path) as store:
            store.append(events)
            if snapshots != "none":
                for cut in range(1, len(events) + 1, 1 if snapshots == "every" else 17):
                    store.save_snapshot(rebuild(events[:cut]))
        before = _digest(path)
        for _ in range(3):
            seq = data.draw(st.integers(0, len(events)))
            point = replay.state(path, at_seq=seq)
            assert point.registry == rebuild(events[:seq]), (seq, snapshots)
            assert point.seq == seq
        assert _digest(path) == before  # the log is read, never written


@pytest.fixture(scope="module")
def monkeypatch_index():
    """Checkpoints every 4 events, so small logs exercise the sidecar path."""
    saved = replay_index.CHECKPOINT_EVERY
    replay_index.CHECKPOINT_EVERY = 4
    yield
    replay_index.CHECKPOINT_EVERY = saved


def _log_without_snapshots(path: Path, count: int) -> list:
    ev = Events()
    events = [ev.listen()]
    for i in range(count):
        name = f"user{i % 7}"
        events.append(ev.join(name) if i < 7 else (ev.link(name) if (i // 7) % 2 else ev.unlink(name, "dropped")))
    with EventStore(path) as store:
        stored = store.append(events)
    return [event.with_seq(seq) for event, seq in zip(events, stored)]


def test_the_sidecar_index_is_built_once_and_answers_like_a_full_fold(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_index, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "lobby.db"
    events = _log_without_snapshots(path, 120)
    sidecar = Path(replay_index.sidecar_path(str(path)))
    assert not sidecar.exists()
    assert replay.state(path, at_seq=100).registry == rebuild(events[:100])
    assert sidecar.exists()
    with sqlite3.connect(sidecar) as conn:
        checkpoints = [row[0] for row in conn.execute("SELECT seq FROM checkpoints ORDER BY seq")]
    assert checkpoints and all(b - a <= 10 for a, b in zip([0, *checkpoints], checkpoints))
    # A later query folds at most CHECKPOINT_EVERY events from a checkpoint.
    folded = []
    real_read = replay_index.Log.read

    def counting_read(self, *args, **kwargs):
        for event in real_read(self, *args, **kwargs):
            folded.append(event.seq)
            yield event

    monkeypatch.setattr(replay_index.Log, "read", counting_read)
    for seq, most in ((35, 10), (99, 10), (121, 21), (121, 10), (115, 10)):
        # past the indexed part (121 the first time), the fold extends the index as it goes
        folded.clear()
        assert replay.state(path, at_seq=seq).registry == rebuild(events[:seq])
        assert len(folded) <= most, seq


def test_a_sidecar_of_another_log_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_index, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "lobby.db"
    _log_without_snapshots(path, 60)
    replay.state(path, at_seq=60)
    os.unlink(path)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(path) + suffix):
            os.unlink(str(path) + suffix)
    ev = Events(session="other", at=1_800_000_000_000_000)
    other = [ev.listen(), ev.join("zed"), *[ev.message("zed", {"type": "x"}) for _ in range(0)]]
    other += [ev.link("zed")] + [ev.broadcast({"type": "x/y"}) for _ in range(57)]
    with EventStore(path) as store:
        store.append(other)
    assert replay.state(path, at_seq=60).registry == rebuild([e.with_seq(i) for i, e in enumerate(other, 1)])


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE checkpoints SET users = 'garbage'",  # does not read: was a traceback
        "UPDATE checkpoints SET users = '[]'",  # does not fold on: was 'the log does not fold', blaming the log
        "DROP TABLE checkpoints; CREATE TABLE checkpoints (x)",  # another shape: was 'sqlite3 LOG .recover'
    ],
)
def test_a_damaged_sidecar_is_made_again_and_the_log_never_blamed(tmp_path, monkeypatch, damage, capsys):
    monkeypatch.setattr(replay_index, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "lobby.db"
    events = _log_without_snapshots(path, 80)
    assert replay.state(path, at_seq=75).registry == rebuild(events[:75])  # the sidecar is made
    with sqlite3.connect(replay_index.sidecar_path(str(path))) as conn:
        conn.executescript(damage)
    assert replay.state(path, at_seq=78).registry == rebuild(events[:78])
    assert replay.state(path, at_seq=79).registry == rebuild(events[:79])  # from checkpoints made again
    assert main(["replay", "state", str(path), "--at-seq", "77"]) == 0
    assert capsys.readouterr().err == ""


def test_a_read_only_folder_keeps_checkpoints_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(replay_index, "CHECKPOINT_EVERY", 10)
    path = tmp_path / "lobby.db"
    events = _log_without_snapshots(path, 80)

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(replay_index, "_connect", refuse)
    assert replay.state(path, at_seq=75).registry == rebuild(events[:75])
    assert replay.state(path, at_seq=78).registry == rebuild(events[:78])  # from the checkpoint in memory
    assert not Path(replay_index.sidecar_path(str(path))).exists()


def test_a_time_in_another_session_is_refused_as_a_seq_is(game_log):
    """With -s, a time in another session of the lobby named that session's state under this one's name; a
    time between two sessions is the state the later one started from or the earlier one ended with (a time
    typed to the minute, before a session's first event, is not refused)."""
    first, second = replay.sessions(game_log)
    for session, moment in ((first.session, "22:01"), (second.session, "21:05")):
        with pytest.raises(ReplayError, match=rf"time {moment} is not in session {session}"):
            replay.state(game_log, session=session, at_time=moment)
    assert replay.state(game_log, session=first.session, at_time="20:59").seq == 0
    assert replay.state(game_log, session=first.session, at_time="21:30").seq == first.last_seq
    assert replay.state(game_log, session=second.session, at_time="21:30").seq == second.first_seq - 1
    assert replay.state(game_log, session=second.session, at_time="23:00").seq == second.last_seq


def test_checkpoints_in_memory_are_not_shared_by_logs_made_alike(tmp_path, monkeypatch):
    """Two logs whose first events are the same (and whose times match seq for seq) in folders where no
    sidecar can be written: one's checkpoints answered for the other."""
    monkeypatch.setattr(replay_index, "CHECKPOINT_EVERY", 10)
    monkeypatch.setattr(replay_index._Sidecar, "_memory", {})

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(replay_index, "_connect", refuse)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _log_without_snapshots(tmp_path / "a" / "lobby.db", 80)
    ev = Events()
    other = [ev.listen(), *(ev.join(f"b{n}") for n in range(79))]
    with EventStore(tmp_path / "b" / "lobby.db") as store:
        store.append(other)
    replay.state(tmp_path / "a" / "lobby.db", at_seq=75)
    assert replay.state(tmp_path / "b" / "lobby.db", at_seq=78).registry == rebuild(
        [e.with_seq(i) for i, e in enumerate(other[:78], 1)]
    )


def test_state_by_time_resolves_to_the_last_event_at_or_before_it(game_log):
    first = replay.sessions(game_log)[0].session
    # bob dropped at 21:03:00 and relinked at 21:03:04
    dropped = replay.state(game_log, session=first, at_time="21:03:02")
    assert dropped.registry.users == {"alice": True, "bob": False, "carol": False}
    assert dropped.seq == 12 and dropped.at == us(START) + 180_000_000
    back = replay.state(game_log, at_time="2026-11-27T21:03:04Z")
    assert back.registry.users["bob"] is True and back.seq == 13
    before = replay.state(game_log, at_time="2026-11-27T20:00:00+00:00")
    assert before.seq == 0 and before.registry.users == {}
    with open_log(game_log) as log:
        for seq in range(0, log.upto + 1):
            at = log.at_of(seq) if seq else us(START) - 1
            resolved = log.seq_at_time(at)
            assert log.at_of(resolved) <= at if resolved else True
            assert resolved == log.upto or log.at_of(resolved + 1) > at


def test_state_without_a_point_is_the_end_of_the_session_or_log(game_log):
    first, second = replay.sessions(game_log)
    end_of_first = replay.state(game_log, session=first.session[:4])
    assert end_of_first.seq == first.last_seq
    assert end_of_first.registry.users == {"alice": False, "bob": False}  # kept for the restart
    assert end_of_first.registry.closed
    end = replay.state(game_log)
    assert end.seq == second.last_seq and end.registry.users == {}


def test_diff_names_who_joined_left_linked_and_unlinked(game_log):
    first, _ = replay.sessions(game_log)
    change = replay.diff(game_log, from_seq=11, to_seq=22)
    # at 11: alice, bob linked, carol joined; at 22: alice unlinked, bob linked, carol kicked, dave left
    assert change.joined == []
    assert change.left == ["carol"]
    assert change.linked == []
    assert change.unlinked == ["alice"]
    whole = replay.diff(game_log, session=first.session)
    assert whole.before.seq == 0 and whole.after.seq == first.last_seq
    assert whole.joined == ["alice", "bob"] and whole.linked == []
    by_time = replay.diff(game_log, session=first.session, from_time="21:02:59", to_time="21:05:00")
    assert by_time.joined == ["dave"] and by_time.left == ["carol"] and by_time.linked == ["dave"]
    with pytest.raises(ReplayError, match=r"the first point \(after seq 22\) is after the second \(after seq 11\)"):
        replay.diff(game_log, from_seq=22, to_seq=11)  # a backwards diff read as the opposite change
    with pytest.raises(ReplayError, match="not an empty string"):
        replay.diff(game_log, session="")  # it matched every session


def test_step_walks_a_session_with_the_registry_after_each_event(crash_log):
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    steps = list(replay.step(db, restarted.session))
    assert [event.seq for event, _ in steps] == list(range(restarted.first_seq, restarted.last_seq + 1))
    # It starts from the registry the crash left: both linked, then recovered one by one.
    assert [(e.type, getattr(e, "reason", None)) for e, _ in steps[:3]] == [
        ("listen", None), ("unlink", "recovered"), ("unlink", "recovered"),
    ]
    assert steps[0][1].users == {"alice": True, "bob": True}
    assert steps[2][1].users == {"alice": False, "bob": False}
    with EventStore.open_readonly(db) as store:
        for event, registry in steps:
            assert registry == rebuild(store.read(to_seq=event.seq))


def test_points_outside_the_log_and_both_forms_are_refused(game_log):
    with pytest.raises(ReplayError, match="not in the log"):
        replay.state(game_log, at_seq=10_000)
    with pytest.raises(ReplayError, match="not both"):
        replay.state(game_log, at_seq=3, at_time="21:00")
    with pytest.raises(ReplayError, match="cannot read time"):
        replay.state(game_log, at_time="yesterday")
    # a clock time is on the date of the session, or of the log's first event
    assert replay.state(game_log, at_time="21:00:30").seq == 3
    with pytest.raises(ReplayError, match="has no date"):
        parse_time("21:00")


def test_the_seq_just_past_the_end_of_the_log_is_refused(game_log):
    """One past the last seq names no event: it is an error, not the end state under another seq."""
    last = replay.sessions(game_log)[-1].last_seq
    assert replay.state(game_log, at_seq=last).seq == last
    with pytest.raises(ReplayError, match=f"seq {last + 1} is not in the log"):
        replay.state(game_log, at_seq=last + 1)
    with pytest.raises(ReplayError, match="not in the log"):
        replay.diff(game_log, from_seq=1, to_seq=last + 1)


def test_step_from_a_seq_before_the_session_starts_at_the_session(crash_log):
    """A from seq before the session's first event walks the session from its start, with the registry the
    crash left (not the registry at the earlier seq with this session's events folded onto it)."""
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    whole = [(event.seq, registry) for event, registry in replay.step(db, restarted.session)]
    for from_seq in (1, crashed.last_seq - 1, restarted.first_seq - 1):
        steps = [(event.seq, registry) for event, registry in replay.step(db, restarted.session, from_seq=from_seq)]
        assert steps == whole, from_seq
    assert whole[0][1].users == {"alice": True, "bob": True}


def _two_lobbies(path: Path) -> None:
    """Lobbies a and b share a log; b's clock runs behind a's, so times do not follow seqs across lobbies."""
    a, b = Events(lobby="a", session="sa", at=1_000), Events(lobby="b", session="sb", at=0)
    events = [a.listen(), b.listen(), a.join("ann"), b.join("bob"), a.link("ann"), b.link("bob"),
              a.unlink("ann", "dropped"), b.unlink("bob", "dropped")]
    with EventStore(path) as store:
        store.append(events)


def test_a_time_in_a_log_of_two_lobbies_is_one_lobbys_time(tmp_path):
    path = tmp_path / "two.db"
    _two_lobbies(path)
    # b's events: listen 1, join 2, link 3, unlink 4 (us); a's: 1001..1004. At 3 us bob is linked in b.
    at = "1970-01-01T00:00:00.000003Z"
    point = replay.state(path, lobby="b", at_time=at)
    assert point.seq == 6 and point.registry.users == {"bob": True}
    assert [e.seq for e in replay.timeline(path, lobby="b", since=at, until=at)] == [6]
    assert [e.seq for e in replay.timeline(path, since=at, until=at)] == [6]  # every lobby: filtered by time
    with pytest.raises(ReplayError, match="several lobbies"):
        replay.state(path, at_time=at)
    with pytest.raises(ReplayError, match="several lobbies"):
        list(replay.step(path))  # which lobby's last session?
    diff = replay.diff(path, lobby="a", from_seq=5, to_seq=7)
    assert (diff.linked, diff.unlinked, diff.left) == ([], ["ann"], [])


def test_a_seq_outside_the_named_session_is_refused(game_log):
    first, second = replay.sessions(game_log)
    with pytest.raises(ReplayError, match=f"not in session {first.session}"):
        replay.state(game_log, session=first.session, at_seq=second.last_seq)
    assert replay.state(game_log, session=first.session, at_seq=first.first_seq - 1).registry.users == {}


def test_a_user_who_left_is_listed_as_left_not_as_unlinked(game_log):
    first = replay.sessions(game_log)[0]
    with EventStore.open_readonly(game_log) as store:
        leave = next(e for e in store.read(session=first.session) if e.type == "leave" and e.reason == "requested")
    diff = replay.diff(game_log, from_seq=leave.seq - 2, to_seq=leave.seq)  # linked at the start
    assert diff.before.registry.users[leave.username] is True
    assert leave.username in diff.left and leave.username not in diff.unlinked


def test_a_time_pasted_from_the_millisecond_output_includes_its_events(tmp_path):
    """Times print to the millisecond; as an upper bound or a point, ``.531`` means up to ``.531999``."""
    ev = Events(at=1_795_824_886_531_000)  # events at .531001, .531002, ...
    path = tmp_path / "ms.db"
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("bot4"), ev.link("bot4")])
    printed = "2026-11-28T00:14:46.531Z"
    assert [e.seq for e in replay.timeline(path, since=printed, until=printed)] == [1, 2, 3]
    assert replay.state(path, at_time=printed).registry.users == {"bot4": True}
    assert replay.state(path, at_time="2026-11-28T00:14:46.531001Z").seq == 1  # microseconds: exact


def test_the_state_of_one_lobby_ends_at_its_own_last_event(tmp_path):
    """Without a point, the state of lobby a is after a's last event (seq 7), at a's time; seq 8 is b's."""
    path = tmp_path / "two.db"
    _two_lobbies(path)
    point = replay.state(path, lobby="a")
    assert (point.seq, point.at, point.registry.users) == (7, 1_004, {"ann": False})
    point = replay.state(path, lobby="b", at_seq=7)  # b's state after seq 7: its time is b's last before it
    assert (point.seq, point.at, point.registry.users) == (7, 3, {"bob": True})


def test_a_session_whose_first_row_is_lost_is_still_listed(tmp_path):
    path = tmp_path / "two.db"
    _two_lobbies(path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM events WHERE seq = 1")  # a's listen
    assert [(s.lobby, s.first_seq, s.start) for s in replay.sessions(path)] == [("a", 1, 1_002), ("b", 2, 1)]


def _timed_log(path: Path, sessions: dict[str, list[tuple[str, str, tuple]]]) -> Path:
    """A log of sessions whose events happen at the given ISO times (UTC): {session: [(time, kind, args)]}."""
    from datetime import datetime

    with EventStore(path) as store:
        for session, events in sessions.items():
            ev = Events(session=session)
            for moment, kind, args in events:
                ev.at = us(datetime.fromisoformat(moment)) - 1
                store.append([getattr(ev, kind)(*args)])
    return path


def _evening(day: str, session: str) -> list[tuple[str, str, tuple]]:
    return [(f"{day}T21:00:00Z", "listen", ()), (f"{day}T21:01:00Z", "join", ("bob",)),
            (f"{day}T21:01:01Z", "link", ("bob",)), (f"{day}T21:14:30Z", "unlink", ("bob", "kick")),
            (f"{day}T21:14:30Z", "leave", ("bob", "kick")), (f"{day}T21:20:00Z", "close", ())]


def test_a_clock_time_is_on_the_day_of_the_log_that_has_it(tmp_path, capsys):
    """'21:14' meant the last session's date: asked the morning after a restart, it named a time after the end
    of the log and answered with today's (empty) lobby; a session across midnight put 00:06 before its start."""
    friday = _timed_log(tmp_path / "friday.db", {
        "fri": _evening("2026-11-27", "fri"),
        "sat": [("2026-11-28T10:00:00Z", "listen", ()), ("2026-11-28T10:05:00Z", "close", ())],
    })
    assert [u["username"] for u in replay.state(friday, at_time="21:14").to_dict()["users"]] == ["bob"]
    bob = list(replay.timeline(friday, users=["bob"], since="21:00", until="21:20"))
    assert [e.type for e in bob] == ["join", "link", "unlink", "leave"]
    # a time names its whole last unit: to the second, or the minute, as an upper bound
    assert [e.type for e in replay.timeline(friday, since="21:14:30", until="21:14:30")] == ["unlink", "leave"]
    assert [e.type for e in replay.timeline(friday, since="21:14", until="21:14")] == ["unlink", "leave"]
    assert replay.state(friday, at_time="22:14:30+01:00").seq == replay.state(friday, at_time="21:14:30Z").seq == 5
    # every ISO form names its own unit (a zone of two digits, the compact form: not a whole day)
    end = us(datetime.fromisoformat("2026-11-27T20:03:00.999999+00:00"))
    assert parse_time("2026-11-27T21:03:00+01", end=True, whole=True) == end
    assert parse_time("20261127T200300Z", end=True, whole=True) == end
    assert parse_time("2026-11-27T20:03Z", end=True, whole=True) == end + 59_000_000
    two_evenings = _timed_log(tmp_path / "evenings.db", {
        "fri": _evening("2026-11-27", "fri"), "sat": _evening("2026-11-28", "sat")})
    with pytest.raises(ReplayError, match=r"'21:14' is on more than one day of the log \(2026-11-27, 2026-11-28\); "
                                          r"give the date, like 2026-11-27T21:14"):
        replay.state(two_evenings, at_time="21:14")
    assert replay.state(two_evenings, session="sat", at_time="21:14").seq == 9  # one day in a session
    assert replay.state(two_evenings, at_time="09:00").seq == 6  # between the two: Saturday morning
    assert main(["replay", "state", str(two_evenings), "--at-time", "21:14"]) == 2
    assert "give the date" in capsys.readouterr().err
    midnight = _timed_log(tmp_path / "midnight.db", {"midn": [
        ("2026-11-27T23:50:00Z", "listen", ()), ("2026-11-27T23:55:00Z", "join", ("bob",)),
        ("2026-11-27T23:55:01Z", "link", ("bob",)), ("2026-11-28T00:05:00Z", "unlink", ("bob", "dropped")),
        ("2026-11-28T00:10:00Z", "close", ()),
    ]})
    linked = lambda moment: replay.state(midnight, session="midn", at_time=moment).to_dict()["users"]  # noqa: E731
    assert linked("23:56") == [{"username": "bob", "isLinked": True}]
    assert linked("00:06") == [{"username": "bob", "isLinked": False}]
    with pytest.raises(ReplayError, match=r"'12:00' is not in session midn \(2026-11-27 23:50:00.000 to 2026-11-28 "
                                          r"00:10:00.000 UTC\); give the date, like 2026-11-27T12:00"):
        list(replay.timeline(midnight, "midn", since="12:00"))


def test_a_time_in_another_session_names_the_bounds_it_missed(tmp_path):
    log = _timed_log(tmp_path / "two.db", {
        "fri": _evening("2026-11-27", "fri"), "sat": _evening("2026-11-28", "sat")})
    with pytest.raises(ReplayError) as refused:
        replay.state(log, session="fri", at_time="2026-11-28T21:05:00Z")
    assert str(refused.value) == ("time 2026-11-28T21:05:00Z is not in session fri (before 2026-11-28 21:00:00.000, "
                                  "when the next began)")


def test_diff_names_who_left_and_came_back_within_the_window(tmp_path, capsys):
    """Net changes only: a kick and a rejoin, or a drop and a relink, between the two points showed as nothing."""
    log = _timed_log(tmp_path / "back.db", {"s": [
        ("2026-11-27T21:00:00Z", "listen", ()), ("2026-11-27T21:01:00Z", "join", ("alice",)),
        ("2026-11-27T21:01:01Z", "link", ("alice",)), ("2026-11-27T21:02:00Z", "join", ("bob",)),
        ("2026-11-27T21:02:01Z", "link", ("bob",)),
        ("2026-11-27T21:10:00Z", "unlink", ("bob", "kick")), ("2026-11-27T21:10:00Z", "leave", ("bob", "kick")),
        ("2026-11-27T21:11:00Z", "join", ("bob",)), ("2026-11-27T21:11:01Z", "link", ("bob",)),
        ("2026-11-27T21:12:00Z", "unlink", ("alice", "dropped")), ("2026-11-27T21:12:30Z", "link", ("alice",)),
        ("2026-11-27T21:13:00Z", "join", ("carol",)),
    ]})
    result = replay.diff(log, from_time="21:05", to_time="21:20")
    assert (result.joined, result.left, result.linked, result.unlinked) == (["carol"], [], [], [])
    assert (result.rejoined, result.relinked) == (["bob"], ["alice"]) and result.changed
    quiet = replay.diff(log, from_time="21:05", to_time="21:09")
    assert not quiet.changed and (quiet.rejoined, quiet.relinked) == ([], [])
    assert main(["replay", "diff", str(log), "--from-time", "21:05", "--to-time", "21:20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  rejoined: bob (left and joined again)" in out and "  relinked: alice (unlinked and linked again)" in out
