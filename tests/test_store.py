"""The SQLite event log: appends, reads, sessions, read-only access and the errors of a bad file."""

from __future__ import annotations

import os
import shutil
import itertools
import sqlite3
import tempfile
import threading
import types
from collections.abc import Callable
from pathlib import Path
from dataclasses import replace

import orjson
import pytest
from freezegun import freeze_time
from sqlite_utils import Database

from events.store import migrations as store_migrations
from events import APPLICATION_ID, Cutoff, Event, EventLogError, EventStore, Join, now_us, rebuild
from events.store import _M001_TYPES, SCHEMA_VERSION, migrations

from .factories import Events


def test_append_assigns_gapless_increasing_seqs(store):
    """Each batch gets the seqs right after the last one, in the order given."""
    ev = Events()
    assert store.append([ev.listen(), ev.join("alice")]) == [1, 2]
    assert store.append([ev.link("alice")]) == [3]
    assert store.append([]) == []
    assert store.last_seq == 3
    assert [e.seq for e in store.read()] == [1, 2, 3]


def test_a_large_batch_of_interleaved_sessions_gets_gapless_seqs_and_session_ranges(store):
    """A batch bigger than one INSERT statement, mixing two lobbies, with a session starting mid-batch."""
    a, b, b2 = Events(lobby="a", session="s1"), Events(lobby="b", session="s2"), Events(lobby="b", session="s3")
    assert store.append([a.listen(), b.listen()]) == [1, 2]
    batch = []
    for i in range(3001):
        batch.append(a.message("alice", {"type": "x/y", "payload": i}) if i % 3 else b.join(f"user{i}"))
    batch.append(b.close())
    batch += [b2.listen(), a.join("zed"), b2.join("bob")]
    seqs = store.append(batch)
    assert seqs == list(range(3, 3 + len(batch)))
    link = a.link("zed")
    assert store.append([link]) == [3 + len(batch)]
    assert [e.seq for e in store.read()] == list(range(1, 4 + len(batch)))
    assert list(store.read(3)) == [event.with_seq(seq) for event, seq in zip(batch, seqs)] + [
        link.with_seq(3 + len(batch))
    ]
    s1, s2, s3 = store.sessions()
    assert (s1.session, s1.first_seq, s1.last_seq) == ("s1", 1, 3 + len(batch))
    assert (s2.session, s2.first_seq, s2.last_seq, s2.closed) == ("s2", 2, seqs[3001], True)
    assert (s3.session, s3.first_seq, s3.last_seq) == ("s3", seqs[3002], seqs[3004])
    assert [e.type for e in store.read(session="s3")] == ["listen", "join"]
    assert s1.counts == {"listen": 1, "message": 2000, "join": 1, "link": 1}
    assert [e.seq for e in store.read(types=["close", "cutoff"])] == [seqs[3001]]  # a type it has none of
    assert store.db.execute("SELECT type FROM log WHERE seq = ?", [seqs[3001]]).fetchone() == ("close",)


@pytest.mark.parametrize("sessions", [1, 2], ids=["one-session", "two-sessions"])
@pytest.mark.parametrize("types", [["message"], ["message", "send"]], ids=["one-type", "two-types"])
def test_a_large_batch_round_trips_whatever_its_columns_share(store, types, sessions):
    """A batch of one session (of one type) binds its session id (type code) once per INSERT: each of its
    chunks (1024 + 256 + 128 + 64 + 16 + 8 + 4 rows) still stores every row's own time, user and data."""
    logs = [Events(lobby=f"l{n}", session=f"s{n}") for n in range(sessions)]
    for ev in logs:
        store.append([ev.listen(), ev.join("alice"), ev.join("bob")])
    batch = []
    for i in range(1500):
        ev = logs[i % sessions]
        make = (ev.message, ev.send)[i // 2 % len(types)]
        batch.append(make(("alice", "bob")[i // 3 % 2], {"type": "x/y", "payload": i}))
    first = 3 * sessions + 1
    seqs = store.append(batch)
    assert seqs == list(range(first, first + 1500))
    assert list(store.read(first)) == [event.with_seq(seq) for event, seq in zip(batch, seqs)]
    for n, session in enumerate(store.sessions()):
        assert (session.session, session.first_seq, session.last_seq) == (f"s{n}", 1 + 3 * n, seqs[n - sessions])
        assert session.events == 3 + 1500 // sessions


def test_events_round_trip_with_their_data(store):
    """What is read back equals what was appended, with its seq."""
    ev = Events()
    appended = [
        ev.listen(port=9000),
        ev.join("alice"),
        ev.link("alice", auth=True),
        ev.message("alice", {"type": "poker/fold", "payload": {"hand": [1, 2]}}),
        ev.send("alice", {"type": "poker/folded"}),
        ev.broadcast({"type": "poker/tick", "payload": None}, skip="alice"),
        ev.unlink("alice", reason="dropped"),
        ev.leave("alice", reason="kick"),
        ev.close(),
    ]
    seqs = store.append(appended)
    assert list(store.read()) == [event.with_seq(seq) for event, seq in zip(appended, seqs)]


def test_read_filters_by_seq_range_lobby_session_user_and_type(store):
    ev1, ev2 = Events(lobby="a", session="s1"), Events(lobby="b", session="s2")
    store.append([ev1.listen(), ev2.listen(), ev1.join("alice"), ev2.join("bob"), ev1.link("alice")])
    assert [e.seq for e in store.read(2, 4)] == [2, 3, 4]
    assert [e.seq for e in store.read(4)] == [4, 5]
    assert [e.seq for e in store.read(lobby="b")] == [2, 4]
    assert [e.seq for e in store.read(session="s1")] == [1, 3, 5]
    assert [e.seq for e in store.read(username="alice")] == [3, 5]
    assert [e.seq for e in store.read(types=["join", "link"], lobby="a")] == [3, 5]


def test_read_is_lazy(store):
    """A read is an iterator that fetches as it goes, not a list of the whole log."""
    ev = Events()
    store.append([ev.listen()] + [ev.join(f"user{i}") for i in range(10_000)])
    events = store.read()
    assert isinstance(events, types.GeneratorType)
    assert next(events).type == "listen"
    assert next(events).username == "user0"


def test_reopen_keeps_every_event(db_path):
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("alice")])
        store.append([ev.link("alice")])
    with EventStore(db_path) as store:
        assert [(e.seq, e.type) for e in store.read()] == [(1, "listen"), (2, "join"), (3, "link")]
        assert store.append([ev.unlink("alice")]) == [4]


def test_file_log_uses_wal_and_full_durability_by_default(db_path, monkeypatch):
    """FULL: every synced append fsyncs the WAL after its commit (SQLite's own FULL step, done by the
    store); NORMAL: never."""
    import os

    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    ev = Events()
    with EventStore(db_path) as store:
        assert store.db.journal_mode == "wal" and store.durability == "full"
        store.append([ev.listen()])
        store.append([ev.join("alice"), ev.link("alice")])
        assert len(synced) == 2 and all(path.endswith("lobby.db-wal") for path in synced)
    synced.clear()
    with EventStore(db_path, durability="normal") as store:
        store.append([ev.unlink("alice")])
        store.sync()
        assert synced == []


def test_bad_durability_is_refused(db_path):
    with pytest.raises(ValueError, match="durability"):
        EventStore(db_path, durability="fast")


def test_sessions_lists_start_end_and_counts(store):
    ev1, ev2 = Events(session="s1"), Events(session="s2", at=1_800_000_000_000_000)
    store.append([ev1.listen(), ev1.join("alice"), ev1.link("alice"), ev1.unlink("alice"), ev1.close()])
    store.append([ev2.listen(), ev2.join("bob"), ev2.link("bob")])
    first, second = store.sessions()
    assert (first.session, first.first_seq, first.last_seq, first.closed) == ("s1", 1, 5, True)
    assert first.start == 1_700_000_000_000_001 and first.end == 1_700_000_000_000_005
    assert first.counts == {"listen": 1, "join": 1, "link": 1, "unlink": 1, "close": 1}
    assert first.users == 1 and first.events == 5
    assert (second.session, second.closed, second.end) == ("s2", False, None)
    assert second.counts == {"listen": 1, "join": 1, "link": 1}
    assert store.sessions(lobby="elsewhere") == []


def test_readonly_open_reads_while_a_writer_appends(db_path):
    ev = Events()
    with EventStore(db_path) as writer:
        writer.append([ev.listen(), ev.join("alice")])
        reader = EventStore.open_readonly(db_path)
        assert reader.last_seq == 2
        writer.append([ev.link("alice")])
        assert [e.type for e in reader.read()] == ["listen", "join", "link"]
        with pytest.raises(EventLogError, match="read-only"):
            reader.append([ev.unlink("alice")])
        reader.close()


def test_reader_sees_whole_batches_never_part_of_one(db_path):
    """While batches of 50 are appended, every read sees a multiple of 50 events."""
    ev = Events()
    batch_size = 50
    with EventStore(db_path, durability="normal") as writer:
        writer.append([ev.listen()] + [ev.join(f"warm{i}") for i in range(batch_size - 1)])
        done, reading = threading.Event(), threading.Event()
        seen: list[int] = []

        def read_repeatedly() -> None:
            with EventStore.open_readonly(db_path) as reader:
                while not done.is_set():
                    seen.append(sum(1 for _ in reader.read()))
                    reading.set()

        thread = threading.Thread(target=read_repeatedly)
        thread.start()
        try:
            assert reading.wait(30)  # on a busy machine the writer could finish before the first read
            for batch in range(40):
                writer.append([ev.join(f"u{batch}-{i}") for i in range(batch_size)])
        finally:
            done.set()
            thread.join()
    assert seen, "the reader never ran"
    assert all(count % batch_size == 0 for count in seen), sorted(set(seen))


def test_timestamps_come_from_the_frozen_clock():
    with freeze_time("2026-11-27 21:03:00.123456"):
        assert now_us() == 1_795_813_380_123_456
        event = Join(lobby="main", session="s", at=now_us(), username="bob")
    assert event.time.isoformat() == "2026-11-27T21:03:00.123456+00:00"


# -- files that are not our log ----------------------------------------------------------------------------


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(db_path):
    db_path.write_bytes(b"this is a text file, not a database\n" * 10)
    before = db_path.read_bytes()
    with pytest.raises(EventLogError, match=f"{db_path}: not an SQLite database"):
        EventStore(db_path)
    with pytest.raises(EventLogError, match="not an SQLite database"):
        EventStore.open_readonly(db_path)
    assert db_path.read_bytes() == before


def test_a_log_that_cannot_be_opened_for_permissions_says_so_not_that_it_is_damaged(db_path, monkeypatch):
    """A read-only folder (SQLite cannot create the -shm file) fails with an OperationalError; the operator
    must be sent to the permissions, not told the log is not an SQLite database."""
    EventStore(db_path).close()
    real_execute = Database.execute

    def readonly(self, sql, *args, **kwargs):
        if sql == "PRAGMA application_id":
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real_execute(self, sql, *args, **kwargs)

    monkeypatch.setattr(Database, "execute", readonly)
    for open_log in (EventStore, EventStore.open_readonly):
        with pytest.raises(EventLogError) as error:
            open_log(db_path)
        assert "not an SQLite database" not in str(error.value)
        assert "attempt to write a readonly database" in str(error.value)
        assert "check the permissions of the file and of its folder" in str(error.value)


def test_a_log_locked_by_another_process_says_so(db_path):
    EventStore(db_path).close()
    holder = sqlite3.connect(db_path, timeout=0)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(EventLogError, match="is locked by another process"):
            EventStore(db_path)
    finally:
        holder.rollback()
        holder.close()


def test_a_database_of_another_application_is_refused_and_left_alone(db_path):
    other = Database(db_path)
    other["customers"].insert({"name": "Ada"})
    other.close()
    with pytest.raises(EventLogError, match=r"another application \(tables: customers\)"):
        EventStore(db_path)
    with pytest.raises(EventLogError, match="another application"):
        EventStore.open_readonly(db_path)
    assert list(Database(db_path)["customers"].rows) == [{"name": "Ada"}]


def test_a_database_with_another_application_id_is_refused(db_path):
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA application_id=1234")
    conn.commit()
    conn.close()
    with pytest.raises(EventLogError, match="application_id 0x4d2"):
        EventStore(db_path)


def test_a_schema_newer_than_this_code_is_refused(db_path):
    with EventStore(db_path) as store:
        store.append([Events().listen()])
        store.db["_sqlite_migrations"].insert(
            {"migration_set": "krmx-lobby", "name": "m999_from_the_future", "applied_at": "2030-01-01"}
        )
    with pytest.raises(EventLogError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        EventStore(db_path)
    with pytest.raises(EventLogError, match="newer than this krmx-lobby supports"):
        EventStore.open_readonly(db_path)
    assert Database(db_path)["events"].count == 1


def test_a_log_with_event_types_of_a_newer_version_is_not_written_to(db_path):
    """New types need no migration: a server started on such a log after a rollback folded without their
    events and appended after them, with no warning (every replay command refuses the log)."""
    with EventStore(db_path) as store:
        store.append([Events().listen()])
        with store.db.conn:
            code = store.db.conn.execute("INSERT INTO types (name) VALUES ('kickall')").lastrowid
            store.db.conn.execute("INSERT INTO events (at, type, sid) VALUES (1700000000000002, ?, 1)", [code])
            store.db.conn.execute("UPDATE sessions SET last_seq = 2")
    with pytest.raises(EventLogError, match=r"holds events of types this krmx-lobby does not know \(kickall\), "
                                            r"written by a newer krmx-lobby; upgrade krmx-lobby to write to it"):
        EventStore(db_path)
    assert Database(db_path)["events"].count == 2


@pytest.mark.parametrize(
    ("sql", "missing"),
    [
        ("DROP VIEW log; DROP TABLE types", "types"),  # not a first build's log: its type column holds codes
        ("DROP TABLE _sqlite_migrations", "_sqlite_migrations"),
        ("DROP VIEW log; DROP TABLE sessions", "sessions"),
        ("DROP VIEW log; DROP TABLE events", "events"),
    ],
)
def test_a_log_missing_a_table_is_refused_untouched(db_path, sql, missing):
    """A log that lost a table is not a first build's to convert (which made every type a number), nor a
    new one to create tables in: it is refused, read or write, and left as it is."""
    with EventStore(db_path) as store:
        store.append([Events().listen(), Events().join("alice")])
    damaged = sqlite3.connect(db_path)
    damaged.executescript(sql)
    damaged.close()
    before = db_path.read_bytes()
    for open_log in (EventStore, EventStore.open_readonly):
        with pytest.raises(EventLogError, match=f"not a complete krmx-lobby event log \\(no {missing} table\\)"):
            open_log(db_path)
    assert db_path.read_bytes() == before


def test_a_log_whose_last_events_are_lost_is_not_written_to(db_path):
    """A damaged last page hides the events on it (max(seq) goes back): a server that numbered new events
    from there would write over seqs the sessions already count. Refused on a write open; readable."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("alice"), ev.link("alice"), ev.message("alice", {"type": "x/y"})])
    damaged = sqlite3.connect(db_path)
    damaged.execute("DELETE FROM events WHERE seq > 2")
    damaged.commit()
    damaged.close()
    with pytest.raises(EventLogError, match=r"is damaged: its last event is seq 2 but its sessions go to seq 4"):
        EventStore(db_path)
    with EventStore.open_readonly(db_path) as reader:
        assert reader.last_seq == 2


def test_the_write_ahead_log_is_cut_back_after_a_long_reader(db_path, monkeypatch):
    """A reader keeps a snapshot, so the WAL grows while it reads; once it is done, a checkpoint cuts the WAL
    back to WAL_SIZE_LIMIT instead of leaving it at its peak until the server stops."""
    monkeypatch.setattr("events.store.WAL_SIZE_LIMIT", 64 * 1024)
    wal = Path(f"{db_path}-wal")
    ev = Events()
    with EventStore(db_path, durability="normal") as writer:
        writer.append([ev.listen()])
        reader = sqlite3.connect(db_path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()  # holds its snapshot until it ends
        for _ in range(50):
            writer.append([ev.join(f"u{i}") for i in range(200)] + [ev.leave(f"u{i}") for i in range(200)])
        peak = wal.stat().st_size
        reader.close()
        writer.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        writer.append([ev.join("last")])  # the first write after a full checkpoint restarts the WAL
        assert peak > 1024 * 1024 and wal.stat().st_size <= 64 * 1024


@pytest.mark.parametrize(
    "bad",
    [
        Join(lobby="main", session="s1", at=2, username=None),
        Join(lobby="main", session="s1", at="abc", username="bob"),
        Join(lobby="main", session="s1", at=1.5, username="bob"),
        Join(lobby="main", session="s1", at=True, username="bob"),
        Join(lobby="main", session="s1", at=2**63, username="bob"),
        Cutoff(lobby="main", session="s1", at=2, connection="c1", reason="rate limit", username=5),
        Event(lobby="main", session="s1", at=2),
    ],
    ids=["no username", "at text", "at float", "at bool", "at beyond 64 bits", "username not text", "bare Event"],
)
def test_an_event_that_could_not_be_read_back_is_refused_and_nothing_of_its_batch_is_written(db_path, bad):
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen()])
        with pytest.raises(EventLogError, match="cannot append"):
            store.append([ev.join("alice"), bad])
        assert [e.type for e in store.read()] == ["listen"]
        assert store.append([ev.join("alice")]) == [2]
    with EventStore(db_path) as store:
        assert rebuild(store.read()).users == {"alice": False}


def _stranger(name: str) -> object:
    """An object with an event's attributes that is not one of the event classes."""
    return type(name, (), {"lobby": "main", "session": "s1", "at": 1, "type": name.lower(),
                           "__repr__": lambda self: f"<{name}>"})()


@pytest.mark.parametrize("first", range(20))
def test_a_refused_batch_names_its_first_bad_event(first):
    """Whatever makes them unreadable, the error names the first one in the batch (the checks run over the
    whole batch at once, by type: they once named the stranger classes first, in the order of a set)."""
    bad_at = Join(lobby="main", session="s1", at=1.5, username="alice")
    with EventStore() as store:
        with pytest.raises(EventLogError, match="at must be UTC microseconds"):
            store.append([bad_at, _stranger(f"Stranger{first}")])
        with pytest.raises(EventLogError, match=f"<First{first}>: not one of the event types"):
            store.append([_stranger(f"First{first}"), _stranger(f"Second{first}"), bad_at])


def test_an_object_that_is_not_an_event_is_refused_and_nothing_of_its_batch_is_written():
    ev = Events()
    with EventStore() as store:
        store.append([ev.listen()])
        with pytest.raises(EventLogError, match="42: not one of the event types"):
            store.append([Events(session="s2").listen(), 42])
        assert store.append([Events(session="s2").listen()]) == [2]
        assert [(s.session, s.first_seq, s.last_seq) for s in store.sessions()] == [("s1", 1, 1), ("s2", 2, 2)]


def test_a_type_first_appended_in_a_refused_batch_is_numbered_again_by_the_next_append(db_path):
    """``cutoff`` is not among the types a new log numbers: its row is added by the batch that first holds one,
    and rolled back with it, so the code append remembers for it must go too."""
    ev = Events()
    cutoff = Cutoff(lobby="main", session="s1", at=2, connection="c1", reason="rate limit")
    with EventStore(db_path) as store:
        store.append([ev.listen()])
        with pytest.raises(EventLogError, match="cannot append"):
            store.append([cutoff, Join(lobby="main", session="s1", at=3, username=None)])
        store.append([cutoff])
    with EventStore.open_readonly(db_path) as store:
        assert [e.type for e in store.read()] == ["listen", "cutoff"]


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"type": "x/y", "payload": {"score": float("nan")}}, "NaN or an infinity"),
        ({"type": "x/y", "payload": [1, float("-inf")]}, "NaN or an infinity"),
        (float("nan"), "NaN or an infinity"),
        ({"type": "x/y", "payload": {1, 2}}, "not JSON serializable"),
        ({"type": "x/y", "payload": orjson.Fragment(b"[1,\x1e,2]")}, "raw JSON .* with a record separator"),
        (orjson.Fragment(b",\x1e"), "raw JSON .* with a record separator"),  # would shift the next event's cut
    ],
    ids=["nan", "infinity", "a bare nan", "a set", "a fragment that would cut the batch", "one that would shift"],
)
def test_data_json_cannot_hold_is_refused_not_stored_as_something_else(db_path, message, words):
    """orjson writes NaN and infinities as null: stored, the event would read back as another one."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("al")])
        with pytest.raises(EventLogError, match=f"cannot append: .*{words}"):
            store.append([ev.message("al", {"type": "x/ok"}), ev.message("al", message)])
        assert store.append([ev.message("al", {"type": "x/y", "payload": None})]) == [3]
        assert [e.message for e in store.read(types=["message"])] == [{"type": "x/y", "payload": None}]


@pytest.mark.parametrize("message", [{"type": "x/y", "payload": [float("nan")]}, float("inf"), {"type": "x/y", "payload": {1}}],
                         ids=["nan", "a bare infinity", "a set"])
def test_data_json_cannot_hold_is_refused_in_a_batch_of_one_too(store, message):
    """A batch of one event is encoded on its own (nothing to cut apart): it is checked the same."""
    ev = Events()
    store.append([ev.listen(), ev.join("al")])
    with pytest.raises(EventLogError, match="cannot append: .*(NaN or an infinity|not JSON serializable)"):
        store.append([ev.message("al", message)])
    assert store.last_seq == 2


def test_data_with_the_batch_separator_in_its_strings_round_trips(store):
    """A batch's data is encoded in one JSON text, cut at raw record separators: one in a string is escaped."""
    ev = Events()
    batch = [ev.listen(), ev.join("a,\x1e,b")]
    batch += [ev.message("a,\x1e,b", {"type": "x/\x1e", "payload": {"\x1e": ",\x1e,", "n": i}}) for i in range(3)]
    assert list(store.read(store.append(batch)[0])) == [e.with_seq(seq) for seq, e in enumerate(batch, 1)]


def test_store_api_misuse_raises_a_clear_error(db_path, monkeypatch):
    monkeypatch.chdir(db_path.parent)  # where EventStore(None) made a file named None
    for path in (None, "", 3):
        with pytest.raises(TypeError, match="path is a non-empty str or path"):
            EventStore(path)
        with pytest.raises(TypeError, match="path is a non-empty str or path"):
            EventStore.open_readonly(path)
    ev = Events()
    store = EventStore(db_path)
    store.append([ev.listen(), ev.join("alice")])
    with pytest.raises(TypeError, match=r"not one string \('join': use \['join'\]\)"):
        list(store.read(types="join"))
    with pytest.raises(ValueError, match="unknown event type joined"):
        list(store.read(types=["joined"]))
    assert [e.type for e in store.read(types=["join", "cutoff"])] == ["join"]
    registry = store.load_registry("main")
    store.close()
    with pytest.raises(EventLogError, match="cannot append: Cannot operate on a closed database"):
        store.append([ev.link("alice")])
    with EventStore.open_readonly(db_path) as reader, pytest.raises(EventLogError, match="read-only, cannot save"):
        reader.save_snapshot(registry)
    assert not (db_path.parent / "None").exists()


def test_a_log_with_two_hard_links_is_not_opened_for_writing(db_path):
    """Two names for one log would make two WALs and two lobby locks: two servers on it corrupted it."""
    with EventStore(db_path) as store:
        store.append([Events().listen()])
    os.link(db_path, db_path.with_name("again.db"))
    for name in (db_path, db_path.with_name("again.db")):
        with pytest.raises(EventLogError, match="has 2 hard links"):
            EventStore(name)
    os.unlink(db_path.with_name("again.db"))
    EventStore(db_path).close()


@pytest.mark.parametrize("stopped", ["before the migrations table", "after the migrations table"])
def test_a_log_whose_first_open_stopped_before_its_tables_is_still_new(db_path, stopped):
    """The first open marks the file as ours, then creates the tables: stopped in between (a full disk, a
    kill during a first deploy), the next open finishes the job instead of refusing the file for ever."""
    half = sqlite3.connect(db_path)
    half.execute(f"PRAGMA application_id={APPLICATION_ID}")
    half.commit()
    half.close()
    if stopped == "after the migrations table":  # sqlite-utils commits it before the first migration
        db = Database(db_path)
        store_migrations.ensure_migrations_table(db)
        db.close()
    with EventStore(db_path) as store:
        assert store.migrated == ["m001_events", "m002_snapshots", "m003_type_codes_only"]
        assert store.append([Events().listen()]) == [1]


def test_a_truncated_log_cannot_be_read_and_says_how_to_recover(db_path):
    """A damaged file of ours is not 'not an SQLite database'."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), *(ev.message("bob", {"type": "a/b", "payload": "x" * 300}) for _ in range(500))])
    os.truncate(db_path, db_path.stat().st_size - 4096)
    for open_log in (EventStore, EventStore.open_readonly):
        with pytest.raises(EventLogError, match=r"cannot be read: database disk image is malformed \(`sqlite3 .* \.recover`"):
            open_log(db_path)


def _in_a_child(call: Callable[[], object]) -> object:
    """``call()`` in a forked child that is not root (root writes anywhere: its child drops to ``nobody``), for
    files and folders made read-only; its result, or its exception as text."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                result: object = call()
            except Exception as error:
                result = f"{type(error).__name__}: {error}"
            os.write(writable, orjson.dumps(result))
        finally:
            os._exit(0)
    os.close(writable)
    with os.fdopen(readable, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return orjson.loads(data)


@pytest.fixture
def shared_folder():
    """A folder other users can read (tmp_path is root's own), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="krmx-permissions-"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_a_closed_log_in_a_folder_the_reader_cannot_write_to_is_read(shared_folder):
    """A stopped server's log owned by the service user, or a read-only copy: a reader cannot create the -shm
    file SQLite's WAL readers need. With no -wal file (no server has the log open), the log is read as it is."""
    path = shared_folder / "lobby.db"
    ev = Events()
    with EventStore(path) as writer:
        writer.append([ev.listen(), ev.join("alice"), ev.close()])
    path.chmod(0o644)
    assert not Path(f"{path}-wal").exists()
    shared_folder.chmod(0o555)

    def read() -> object:
        with EventStore.open_readonly(path) as reader:
            return [event.type for event in reader.read()]

    assert _in_a_child(read) == ["listen", "join", "close"]
    assert not Path(f"{path}-shm").exists()


def test_a_log_the_user_cannot_write_is_refused_when_opened_for_writing(shared_folder):
    """Not at the first append, once a server listens: at the open, naming the file, leaving nothing behind."""
    path = shared_folder / "lobby.db"
    with EventStore(path) as writer:
        writer.append([Events().listen()])
    path.chmod(0o444)
    shared_folder.chmod(0o777)
    error = _in_a_child(lambda: repr(EventStore(path)))
    assert error == f"EventLogError: {path}: is read-only for this user; writing the log needs write access to it " \
                    "(to read it, `lobby replay` opens it read-only)"
    assert sorted(p.name for p in shared_folder.iterdir()) == ["lobby.db"]


def test_a_path_the_user_cannot_use_is_refused_with_what_is_wrong(shared_folder, tmp_path):
    """The usual deploy mistakes, each named at the open (not as a port that cannot be listened on, nor as
    SQLite's 'unable to open database file'), leaving nothing behind."""
    hidden = shared_folder / "private"
    hidden.mkdir(mode=0o700)  # root's: the service user cannot enter it
    assert _in_a_child(lambda: repr(EventStore(hidden / "lobby.db"))) == (
        f"EventLogError: {hidden}/lobby.db: cannot be used: Permission denied"
    )
    closed = shared_folder / "closed"
    closed.mkdir(mode=0o755)  # it may enter, not create files
    assert _in_a_child(lambda: repr(EventStore(closed / "lobby.db"))) == (
        f"EventLogError: {closed}/lobby.db: cannot be created: folder {str(closed)!r} is not writable for this user"
    )
    path = shared_folder / "lobby.db"
    with EventStore(path) as writer:
        writer.append([Events().listen()])
        Path(f"{path}-wal").chmod(0o644)  # a server killed while it ran as root left these behind
        path.chmod(0o666)
        shared_folder.chmod(0o777)
        assert _in_a_child(lambda: repr(EventStore(path))) == (
            f"EventLogError: {path}: its {str(path) + '-wal'!r} is read-only for this user"
        )
    long_name = tmp_path / ("a" * 300 + ".db")
    with pytest.raises(EventLogError, match="cannot be used: File name too long"):
        EventStore(long_name)


def test_readonly_open_of_a_missing_file_or_a_folder_fails_clearly(tmp_path):
    with pytest.raises(EventLogError, match="no such file"):
        EventStore.open_readonly(tmp_path / "missing.db")
    with pytest.raises(EventLogError, match="is a directory"):
        EventStore.open_readonly(tmp_path)
    with pytest.raises(EventLogError, match="is a directory"):
        EventStore(tmp_path)
    with pytest.raises(EventLogError, match="does not exist"):
        EventStore(tmp_path / "nowhere" / "lobby.db")
    assert not (tmp_path / "missing.db").exists()


def test_readonly_open_of_an_empty_database_fails_clearly(db_path):
    db_path.touch()
    with pytest.raises(EventLogError, match="is empty"):
        EventStore.open_readonly(db_path)


def test_a_version_1_log_stays_readable_and_is_migrated_on_write(db_path):
    """A log written before the snapshots table existed reads as it is and migrates when opened to write."""
    db = Database(db_path)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    migrations.apply(db, stop_before="m002_snapshots")
    db.close()
    legacy = sqlite3.connect(db_path)
    legacy.execute("INSERT INTO sessions (sid, lobby, session, first_seq, last_seq) VALUES (1, 'main', 's1', 1, 2)")
    legacy.execute(
        "INSERT INTO events (seq, sid, at, type, username, data) VALUES "
        "(1, 1, 10, (SELECT code FROM types WHERE name = 'listen'), NULL, NULL), "
        "(2, 1, 11, (SELECT code FROM types WHERE name = 'join'), 'alice', NULL)"
    )
    legacy.commit()
    legacy.close()
    with EventStore.open_readonly(db_path) as reader:
        assert [e.type for e in reader.read()] == ["listen", "join"]
        assert list(reader.load_registry("main").users) == ["alice"]
        assert "snapshots" not in reader.db.table_names()
    with EventStore(db_path) as store:
        assert "snapshots" in store.db.table_names()
        assert [m.name for m in migrations.applied(store.db)] == ["m001_events", "m002_snapshots", "m003_type_codes_only"]
        assert store.migrated == ["m002_snapshots", "m003_type_codes_only"]  # the server logs it
        assert list(store.load_registry("main").users) == ["alice"]
    with EventStore(db_path) as store:
        assert store.migrated == []


def _log_at_version_2(db_path, rows: str) -> None:
    """A log as the second session's builds left it (m001, m002), with ``rows`` (SQL values) in session s1."""
    db = Database(db_path)
    db.execute(f"PRAGMA application_id={APPLICATION_ID}")
    migrations.apply(db, stop_before="m003_type_codes_only")
    db.close()
    legacy = sqlite3.connect(db_path)
    legacy.execute(f"INSERT INTO events (seq, sid, at, type, username, data) VALUES {rows}")
    legacy.execute("INSERT INTO sessions (sid, lobby, session, first_seq, last_seq) "
                   "SELECT 1, 'main', 's1', min(seq), max(seq) FROM events")
    legacy.commit()
    legacy.close()


def test_rows_a_first_build_wrote_into_a_log_of_ours_are_converted_and_kept_out_from_then_on(db_path):
    """A first build (type names, not codes) took a log of ours at m002 for its own and wrote names into the
    type column: every reader failed at those rows, blaming a newer krmx-lobby, and a server folded without
    them. The read says what happened and how to convert; the next write open converts them; and from then on
    a first build refuses the log, for its unknown migration."""
    _log_at_version_2(db_path, "(1, 1, 10, 1, NULL, NULL), (2, 1, 11, 2, 'alice', NULL), "
                               "(3, 1, 12, 'join', 'zed', NULL), (4, 1, 13, 'link', 'zed', NULL)")
    with EventStore.open_readonly(db_path) as reader, pytest.raises(
        EventLogError, match=r"seq 3: its type is a name \('join'\), as only the first builds of krmx-lobby wrote, "
                             r"which needs converting: stop the server writing it"):
        list(reader.read())
    with EventStore(db_path) as store:
        assert store.migrated == ["m003_type_codes_only"]
        assert [(e.type, getattr(e, "username", None)) for e in store.read()] == [("listen", None), ("join", "alice"), ("join", "zed"),
                                                                ("link", "zed")]
        assert store.load_registry("main").linked() == ["zed"]


@pytest.mark.parametrize(("stray_type", "said"), [
    ("99", "seq 3: cannot read this event \\(unknown event type code 99\\)"),
    ("'join'", "seq 3: its type is a name \\('join'\\), as only the first builds of krmx-lobby wrote"),
])
def test_the_fold_stops_at_a_row_of_no_known_type(db_path, stray_type, said):
    """The fold reads the lifecycle types alone: a row of an unknown type (put there by hand, after the
    conversion) was passed over, and a server started without that row's user, appending after it."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("alice")])
    tampered = sqlite3.connect(db_path)
    tampered.execute(f"INSERT INTO events (seq, sid, at, type, username, data) VALUES (3, 1, 99, {stray_type}, 'zed', NULL)")
    tampered.execute("UPDATE sessions SET last_seq = 3")
    tampered.commit()
    tampered.close()
    with EventStore(db_path) as store, pytest.raises(EventLogError, match=said):
        store.load_registry("main")
    other = Events(lobby="other", session="o1")
    with EventStore(db_path) as store:
        store.append([other.listen(), other.join("bob")])
        assert list(store.load_registry("other").users) == ["bob"]  # another lobby's row is not its fold's


def test_a_read_only_fold_stops_at_a_type_a_newer_version_added(db_path):
    """A newer krmx-lobby adds its types to the types table: writing is refused, but a read-only fold
    (``replay state``) passed over its rows, a registry without what they did."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("alice")])
    newer = sqlite3.connect(db_path)
    newer.execute("INSERT INTO types (name) VALUES ('rename')")
    newer.execute("INSERT INTO events (seq, sid, at, type, username, data) "
                  "VALUES (3, 1, 99, (SELECT code FROM types WHERE name = 'rename'), 'alice', NULL)")
    newer.execute("UPDATE sessions SET last_seq = 3")
    newer.commit()
    newer.close()
    with EventStore.open_readonly(db_path) as reader, pytest.raises(
            EventLogError, match="seq 3: cannot read this event .*written by a newer krmx-lobby"):
        reader.load_registry("main")


@pytest.mark.parametrize("stray", ["99", "'jion'"])
def test_a_row_whose_type_is_no_type_of_the_log_is_refused_for_writing(db_path, stray):
    """Neither a code nor the name of a type: damage the conversion cannot undo. Writing is refused (it would
    fold past the row), the log stays as it was (a name was added to the types as a newer type's), and reading
    stops at the row."""
    _log_at_version_2(db_path, f"(1, 1, 10, 1, NULL, NULL), (2, 1, 11, 2, 'alice', NULL), (3, 1, 12, {stray}, 'zed', NULL)")
    with pytest.raises(EventLogError, match=f"^{db_path}: is damaged: seq 3 has the type {stray}, which is not one of "
                                            "the log's event types; refusing to write to it"):
        EventStore(db_path)
    with EventStore.open_readonly(db_path) as reader:
        assert [m.name for m in migrations.applied(reader.db)] == ["m001_events", "m002_snapshots"]
        assert reader.db.execute("SELECT count(*) FROM types").fetchone() == (len(_M001_TYPES),)
        assert [e.type for e in itertools.islice(reader.read(), 2)] == ["listen", "join"]


#: The first builds' layouts, made from a current log: type names (no types table), and in the very first
#: build also the lobby and session in every row (no sessions table) with an index on them.
_FIRST_BUILDS = {
    "type names": """DROP VIEW log;
        CREATE TABLE old_events (seq INTEGER PRIMARY KEY, sid INTEGER NOT NULL REFERENCES sessions (sid),
            at INTEGER NOT NULL, type TEXT NOT NULL, username TEXT, data BLOB);
        INSERT INTO old_events SELECT e.seq, e.sid, e.at, t.name, e.username, CAST(e.data AS BLOB)
            FROM events e JOIN types t ON t.code = e.type;
        DROP TABLE events; DROP TABLE types;
        ALTER TABLE old_events RENAME TO events;
        CREATE VIEW log AS SELECT e.seq, s.lobby, s.session, e.at, e.type, e.username, e.data
            FROM events e JOIN sessions s USING (sid);""",
    "lobby and session per row": """DROP VIEW log;
        CREATE TABLE old_events ([seq] INTEGER PRIMARY KEY, [lobby] TEXT NOT NULL, [session] TEXT NOT NULL,
            [at] INTEGER NOT NULL, [type] TEXT NOT NULL, [username] TEXT, [data] BLOB);
        INSERT INTO old_events SELECT e.seq, s.lobby, s.session, e.at, t.name, e.username, CAST(e.data AS BLOB)
            FROM events e JOIN types t ON t.code = e.type JOIN sessions s USING (sid);
        DROP TABLE events; DROP TABLE types; DROP TABLE sessions;
        ALTER TABLE old_events RENAME TO events;
        CREATE INDEX idx_events_lobby_session_seq ON events (lobby, session, seq);""",
}


@pytest.mark.parametrize("layout", _FIRST_BUILDS)
def test_a_log_of_the_first_builds_is_converted_on_write_and_explained_on_read(db_path, layout):
    """A read-only open says how to convert it; a write open converts it, keeping every event and its seq."""
    ev, other = Events(), Events(lobby="other", session="o1")
    events = [ev.listen(), other.listen(), ev.join("al"), ev.link("al"), other.close(), ev.message("al", {"type": "x/y"}),
              ev.unlink("al"), Cutoff(lobby="main", session="s1", at=ev.at + 1, connection="c1", reason="rate limit")]
    with EventStore(db_path) as store:
        store.append(events)
    first_build = sqlite3.connect(db_path)
    first_build.executescript(_FIRST_BUILDS[layout])
    first_build.close()
    with pytest.raises(EventLogError, match="first build of krmx-lobby .* stop the server writing it, then open it once for writing"):
        EventStore.open_readonly(db_path)
    with EventStore(db_path) as store:
        assert store.migrated == ["m001_events (type codes)"]
        assert list(store.read()) == [replace(e, seq=i) for i, e in enumerate(events, 1)]
        assert [(s.lobby, s.first_seq, s.last_seq) for s in store.sessions()] == [("main", 1, 8), ("other", 2, 5)]
        assert store.append([ev.close()]) == [9]
        assert store.db.execute("SELECT type FROM log WHERE seq = 8").fetchone() == ("cutoff",)
    with EventStore.open_readonly(db_path) as reader:
        assert [e.type for e in reader.read(lobby="main")] == [*(e.type for e in events if e.lobby == "main"), "close"]


def test_message_bodies_are_stored_as_json_text(db_path):
    """The data column holds JSON text that any SQLite tool can read with json_extract."""
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen(), ev.join("al"), ev.link("al"), ev.message("al", {"type": "x/y", "payload": "é"})])
        row = store.db.execute(
            "SELECT typeof(data), json_extract(data, '$.message.payload') FROM log WHERE seq = 4"
        ).fetchone()
    assert row == ("text", "é")


def test_each_type_stores_its_data_as_its_data_json_alone_in_a_batch_or_mixed(store):
    """A batch of one type and a mixed batch store the same text: the JSON of each event's data(), or NULL."""
    ev = Events()
    events = [ev.listen(port=9), ev.join("al"), ev.link("al", auth=True), ev.message("al", {"type": "x/y", "payload": [1.5]}),
              ev.send("al", {"type": "x/z"}), ev.broadcast({"type": "x/b"}, skip="al"), ev.unlink("al", "dropped"),
              Cutoff(lobby="main", session="s1", at=ev.at + 1, connection="c1", reason="rate limit", username="al"),
              ev.leave("al", "kick"), ev.close("server restart")]
    for event in events:
        store.append([event, event])
    store.append(events)
    expected = [orjson.dumps(event.data()).decode() if event.data() else None for event in events]
    stored = [data for (data,) in store.db.execute("SELECT data FROM events ORDER BY seq")]
    assert stored == [text for text in expected for _ in range(2)] + expected


def test_data_stored_as_blobs_by_earlier_versions_reads_the_same(db_path):
    """Earlier versions wrote the JSON as blobs: such rows read as the events they were."""
    ev = Events()
    events = [ev.listen(), ev.join("al"), ev.link("al"), ev.message("al", {"type": "x/y", "payload": "é"})]
    with EventStore(db_path) as store:
        store.append(events)
        store.db.execute("UPDATE events SET data = CAST(data AS BLOB) WHERE data IS NOT NULL")
        store.db.conn.commit()
        assert {t for t, in store.db.execute("SELECT typeof(data) FROM events")} == {"null", "blob"}
    with EventStore.open_readonly(db_path) as reader:
        assert list(reader.read()) == [replace(e, seq=i) for i, e in enumerate(events, 1)]


def test_deferred_appends_are_made_durable_by_one_sync(db_path, monkeypatch):
    """append(sync=False) commits without an fsync (visible at once); sync() fsyncs the WAL once."""
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    ev = Events()
    with EventStore(db_path) as store:
        store.append([ev.listen()], sync=False)
        store.append([ev.join("alice")], sync=False)
        with EventStore.open_readonly(db_path) as reader:
            assert [e.type for e in reader.read()] == ["listen", "join"]
        assert synced == []
        store.sync()
        assert len(synced) == 1 and os.readlink(f"/proc/self/fd/{synced[0]}").endswith("lobby.db-wal")
        store.sync()  # nothing new to sync
        assert len(synced) == 1


def test_a_symlinked_log_syncs_its_real_wal_and_two_paths_to_it_share_one_claim(tmp_path):
    """The usual deploy layout, releases/N/lobby.db -> shared/lobby.db: SQLite keeps the WAL beside the real
    file, so that is the one to fsync; and a second path to the same log meets the first one's claim."""
    (tmp_path / "shared").mkdir()
    for release in ("a", "b"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "lobby.db").symlink_to(tmp_path / "shared" / "lobby.db")
    ev = Events()
    with EventStore(tmp_path / "a" / "lobby.db") as first:
        first.claim("main")
        first.append([ev.listen(), ev.join("alice")])  # FULL: fsyncs the WAL
        assert (tmp_path / "shared" / "lobby.db-wal").exists()
        with EventStore(tmp_path / "b" / "lobby.db") as second:
            with pytest.raises(EventLogError, match="lobby 'main' is in use by another server"):
                second.claim("main")
    with EventStore.open_readonly(tmp_path / "b" / "lobby.db") as reader:
        assert [e.type for e in reader.read()] == ["listen", "join"]


def test_load_registry_of_one_lobby_ends_at_its_own_last_event(db_path):
    """Two lobbies share a log: each registry stands at its own lobby's last event (a custom message
    here), not at the other lobby's later events, and equals a full fold of that lobby's events."""
    a, b = Events(lobby="a", session="sa"), Events(lobby="b", session="sb")
    log = [
        a.listen(), b.listen(), a.join("al"), a.link("al"), b.join("bo"),
        a.message("al", {"type": "x/y"}), b.link("bo"), b.unlink("bo", "dropped"),
    ]
    with EventStore(db_path) as store:
        store.append(log)
        stored = list(store.read())
        assert store.load_registry("a").seq == 6
        assert store.load_registry("a") == rebuild(e for e in stored if e.lobby == "a")
        assert store.load_registry("b") == rebuild(e for e in stored if e.lobby == "b")
        assert store.load_registry("a", to_seq=5) == rebuild(e for e in stored[:5] if e.lobby == "a")
        assert store.load_registry("nobody").lobby is None


def test_unknown_keys_in_a_rows_data_are_dropped_on_read(db_path):
    """A log written by a newer minor version may carry extra data keys: this version still reads its events
    (and folds them), without those keys."""
    ev = Events()
    events = [ev.listen(port=9000), ev.join("al"), ev.link("al", auth=True)]
    with EventStore(db_path) as store:
        store.append(events)
        store.db.execute("UPDATE events SET data = json_set(coalesce(data, '{}'), '$.colour', 'red')")
        store.db.conn.commit()
    with EventStore.open_readonly(db_path) as reader:
        assert list(reader.read()) == [replace(e, seq=i) for i, e in enumerate(events, 1)]
        assert reader.load_registry("main").users == {"al": True}


def test_a_failed_append_that_opened_a_new_session_leaves_no_trace_of_it(db_path):
    """The session row it created is rolled back with the batch: the next append of that session creates it
    again, so the session is listed and its events are read and folded (also after reopening)."""
    ev = Events()
    with EventStore(db_path) as store:
        with pytest.raises(EventLogError, match="cannot append"):
            store.append([ev.listen(), Join(lobby="main", session="s1", at=ev.at + 1, username=None)])
        assert store.sessions() == []
        assert store.append([ev.listen(), ev.join("alice")]) == [1, 2]
        assert [(s.session, s.first_seq, s.last_seq) for s in store.sessions()] == [("s1", 1, 2)]
        assert [e.type for e in store.read(session="s1")] == ["listen", "join"]
    with EventStore(db_path) as store:
        assert [(s.session, s.first_seq, s.last_seq) for s in store.sessions()] == [("s1", 1, 2)]
        assert store.load_registry("main").users == {"alice": False}
        assert store.append([ev.link("alice")]) == [3]


def test_a_snapshot_ahead_of_the_log_is_refused(store):
    """A registry folded past the log's end (events the log never got) must not become a snapshot: once the
    log reaches that seq with other events, load_registry would resume from a state the log never had."""
    ev = Events()
    store.append([ev.listen(), ev.join("alice")])
    ahead = rebuild([*store.read(), ev.join("bob").with_seq(3)])
    with pytest.raises(ValueError, match=r"registry at seq 3 is ahead of the log \(last seq 2\)"):
        store.save_snapshot(ahead)
    store.append([ev.link("alice")])
    assert store.load_registry("main") == rebuild(store.read())
    assert store.load_registry("main").users == {"alice": True}


def test_a_log_whose_write_ahead_file_is_left_without_it_is_not_started_over(tmp_path):
    """A log moved or deleted while a server wrote to it (and not checkpointed, a SIGKILL): its last events are
    in the -wal left at the old path, which SQLite threw away with the new log it started there."""
    db = tmp_path / "lobby.db"
    (tmp_path / "lobby.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 28)  # a WAL header, frames or not
    with pytest.raises(EventLogError, match=r"does not exist, but .*lobby.db-wal' does: it holds the last events"):
        EventStore(db)
    assert not db.exists()
    (tmp_path / "lobby.db-wal").unlink()
    EventStore(db).close()
    with pytest.raises(EventLogError, match="is not a regular file"):
        EventStore("/dev/null")  # SQLite failed with "disk I/O error", and left /dev/null-journal behind
