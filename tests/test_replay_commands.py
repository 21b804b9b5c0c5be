"""replay sessions, timeline, stats, export, step and state on logs of real server sessions (freezegun for
the times), through the Python functions and the ``lobby replay`` command line."""

from __future__ import annotations

import contextlib

import io
import os
import stat
import threading

import orjson
import pytest

import replay
from events import EventLogError, EventStore, rebuild
from lobby.cli import main
from replay.reader import open_log

from .factories import Events, garbled_log
from .replay_logs import START, crash_log, game_log, us  # noqa: F401 - fixtures


def run(capsys, *argv):
    code = main(["replay", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sessions_lists_start_end_duration_users_and_counts(game_log, crash_log, capsys):
    first, second = replay.sessions(game_log)
    assert (first.start, first.end, first.duration) == (us(START), us(START) + 600_000_000, 600_000_000)
    assert first.status == "closed for a restart" and second.status == "closed"
    assert (first.users, first.events, first.counts["link"], first.counts["unlink"]) == (4, 26, 6, 6)
    assert second.duration == 300_000_000 and second.users == 2
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    assert crashed.end is None and crashed.status == "ended without close"
    assert restarted.status == "closed" and restarted.counts["unlink"] == 3
    code, out, _ = run(capsys, "sessions", db)
    assert code == 0
    assert "ended without close" in out and crashed.session in out and restarted.session in out
    code, out, _ = run(capsys, "sessions", game_log, "--json")
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [row["session"] for row in rows] == [first.session, second.session]
    assert rows[0]["start"] == "2026-11-27T21:00:00.000000Z" and rows[0]["duration_s"] == 600.0


def test_a_session_without_close_at_the_end_of_the_log_is_not_yet_closed(tmp_path):
    ev = Events()
    path = tmp_path / "open.db"
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("alice")])
    assert replay.sessions(path)[0].status == "no close yet"


def test_timeline_filters_by_user_type_time_and_seq(game_log, capsys):
    first = replay.sessions(game_log)[0].session
    bob = list(replay.timeline(game_log, first, users=["bob"], since="21:02", until="21:03:02"))
    assert [(e.seq, e.type) for e in bob] == [(10, "message"), (11, "send"), (12, "unlink")]
    unlinks = list(replay.timeline(game_log, types=["unlink", "leave"], from_seq=12, to_seq=22))
    assert [e.seq for e in unlinks] == [12, 15, 18, 20, 21, 22]
    everyone = list(replay.timeline(game_log))
    assert [e.seq for e in everyone] == list(range(1, 35))
    # One name as a string is that name, not its letters (which matched nothing, or were unknown types).
    bob_unlinks = list(replay.timeline(game_log, first, users=["bob"], types=["unlink"]))
    assert len(bob_unlinks) == 2 and list(replay.timeline(game_log, first, users="bob", types="unlink")) == bob_unlinks
    with pytest.raises(replay.ReplayError, match="a time is a string, a datetime or microseconds"):
        list(replay.timeline(game_log, since=1.5))
    code, out, _ = run(capsys, "timeline", game_log, "-s", first[:5], "-u", "bob", "--since", "21:02",
                       "--until", "21:03:02")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["seq", "time", "(UTC)", "type", "user", "detail"]
    assert lines[3].split() == ["12", "2026-11-27", "21:03:00.000", "unlink", "bob", "dropped"]
    code, out, _ = run(capsys, "show", game_log, "-t", "link", "--json", "--to-seq", "5")
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [(r["seq"], r["username"], r["auth"], r["time"]) for r in rows] == [
        (3, "alice", True, "2026-11-27T21:00:30.000000Z"), (5, "bob", False, "2026-11-27T21:01:00.000000Z"),
    ]
    code, out, _ = run(capsys, "timeline", game_log, "-u", "nobody")
    assert code == 0 and "(no events match)" in out
    code, _, err = run(capsys, "timeline", game_log, "-t", "shout")
    assert code == 2 and "unknown event type shout" in err


def test_state_and_diff_on_the_command_line(game_log, capsys):
    code, out, _ = run(capsys, "state", game_log, "--at-time", "2026-11-27T21:03:02Z")
    assert code == 0
    assert out.splitlines() == [
        f"lobby main, session {replay.sessions(game_log)[0].session}, after seq 12 (2026-11-27 21:03:00.000)",
        "  ● alice                    linked",
        "  ○ bob                      unlinked",
        "  ○ carol                    unlinked",
        "3 users, 1 linked",
    ]
    code, out, _ = run(capsys, "state", game_log, "--at-seq", "13", "--json")
    assert orjson.loads(out)["users"] == [
        {"username": "alice", "isLinked": True}, {"username": "bob", "isLinked": True},
        {"username": "carol", "isLinked": False},
    ]
    code, out, _ = run(capsys, "diff", game_log, "--from-seq", "11", "--to-seq", "22")
    assert code == 0 and "  left:     carol" in out and "  unlinked: alice" in out


def test_step_prints_the_registry_after_each_event_and_pauses_on_request(crash_log, capsys, monkeypatch):
    db, _ = crash_log
    restarted = replay.sessions(db)[1]
    code, out, _ = run(capsys, "step", db, "-s", restarted.session, "--no-pause")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 * restarted.events
    assert "unlink" in lines[2] and "recovered" in lines[2] and lines[3].split() == ["users:", "○", "alice", "●", "bob"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\nq\n"))
    code, out, _ = run(capsys, "step", db, "-s", restarted.session, "--pause")
    assert code == 0 and out.count("users:") == 3  # two Enters, then quit at the third event


def test_stats_per_session_and_per_user(game_log, crash_log, capsys):
    report = replay.stats(game_log)
    first, second = report.sessions
    bob = first.users["bob"]
    assert bob.drops == {"dropped": 1} and bob.relinks_us == [4_000_000]
    # linked 21:01:00-21:03:00 and 21:03:04-21:10:00
    assert bob.linked_us == (120 + 416) * 1_000_000
    assert bob.messages == {"test/echo": 1}
    assert first.users["alice"].linked_us == (390 + 150) * 1_000_000 and first.users["alice"].drops == {}
    assert first.users["dave"].drops == {"invalid message": 1} and first.users["dave"].left == "requested"
    assert first.users["carol"].left == "kick" and first.users["carol"].linked_us == 0
    assert first.messages == {"admin/add-bot": 1, "admin/kick": 1, "chat/say": 1, "test/echo": 1}
    assert first.sent == {"chat/said": 1, "test/echoed": 1}
    assert second.users["bob"].linked_us == 240 * 1_000_000
    assert report.users["bob"].linked_us == bob.linked_us + 240 * 1_000_000
    db, _ = crash_log
    crashed, restarted = replay.stats(db).sessions
    assert restarted.drops == {"recovered": 2}
    assert restarted.users["bob"].relinks_us and restarted.users["alice"].never_relinked == 0  # alice left
    code, out, _ = run(capsys, "stats", game_log, "-s", first.summary.session)
    assert code == 0 and "drops 2 (dropped 1, invalid message 1)" in out
    assert "relink after a drop: median 17.000s, max 30.000s over 2" in out
    code, out, _ = run(capsys, "stats", game_log, "--json")
    data = orjson.loads(out)
    assert data["sessions"][0]["drop_reasons"] == {"dropped": 1, "invalid message": 1}


def test_export_a_session_or_a_seq_range_as_json_lines(game_log, tmp_path, capsys):
    second = replay.sessions(game_log)[1]
    target = tmp_path / "second.jsonl"
    assert replay.export(game_log, target, session=second.session) == second.events
    rows = [orjson.loads(line) for line in target.read_bytes().splitlines()]
    assert [row["seq"] for row in rows] == list(range(second.first_seq, second.last_seq + 1))
    with EventStore.open_readonly(game_log) as store:
        assert rows == [dict(e.to_dict(), time=rows[i]["time"]) for i, e in enumerate(store.read(session=second.session))]
    code, out, err = run(capsys, "export", game_log, "--from-seq", "3", "--to-seq", "5")
    assert code == 0 and [orjson.loads(line)["seq"] for line in out.splitlines()] == [3, 4, 5]
    code, _, err = run(capsys, "export", game_log, "-o", tmp_path / "all.jsonl")
    assert code == 0 and "wrote 34 events" in err
    code, _, err = run(capsys, "export", game_log, "-o", tmp_path / "missing" / "x.jsonl")
    assert (code, err) == (2, f"lobby replay export: {tmp_path / 'missing' / 'x.jsonl'}: No such file or directory\n")


def test_commands_work_while_a_server_writes_the_log(tmp_path):
    """A writer appends while replay reads: every command sees one consistent log up to where it started."""
    path = tmp_path / "busy.db"
    ev = Events()
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("alice"), ev.link("alice")])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write():
        try:
            with EventStore(path, durability="normal") as store:
                n = 0
                while not stop.is_set():
                    n += 1
                    store.append([ev.join(f"u{n}"), ev.link(f"u{n}"), ev.message(f"u{n}", {"type": "x/y"}),
                                  ev.unlink(f"u{n}", "dropped")])
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(5):
            report = replay.verify(path, live=True)
            assert report.ok and report.events == report.last_seq, report.problems[:3]
            point = replay.state(path)
            with EventStore.open_readonly(path) as store:
                assert point.registry == rebuild(store.read(to_seq=point.seq))
            assert len(list(replay.timeline(path, types=["link"]))) >= 1
            assert replay.stats(path).sessions[0].users["alice"].links == 1
    finally:
        stop.set()
        writer.join(10)
    assert not errors


def test_a_log_read_as_immutable_that_a_server_opens_meanwhile_gives_no_answer(tmp_path, capsys, monkeypatch):
    """A stopped server's log, read from a folder the reader may not write to, is opened immutable (SQLite's
    promise that the file does not change): a server started on it meanwhile made an export silently short."""
    import events.store

    ev = Events()
    path = tmp_path / "lobby.db"
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("alice"), ev.close()])
    monkeypatch.setattr(events.store, "_readable", lambda conn: False)  # as for a reader without write access
    with pytest.raises(EventLogError, match="changed while it was read"):
        with open_log(path) as log:
            assert log.store._immutable
            with EventStore(path) as server:  # a server starts on the log: its -wal file, its writes
                server.append([Events(session="s2", at=1_700_000_000_000_100).listen()])
    with open_log(path) as log:  # the server gone again: read whole
        assert log.upto == 4
    # The commands that stream their answer (timeline, step) check at their end too.
    for command in (replay.timeline, replay.step):
        streamed = command(path)
        next(streamed)
        with EventStore(path) as server:
            server.append([Events(session="s3", at=1_700_000_000_000_200).listen()])
        with pytest.raises(EventLogError, match="changed while it was read"):
            list(streamed)


def test_replay_never_writes_over_the_log_it_reads(game_log, capsys):
    before = open(game_log, "rb").read()
    for command, target in (("export", game_log), ("html", game_log), ("export", f"{game_log}-wal"),
                            ("export", f"{game_log}-main.lock")):  # replaced, it would let a second server in
        code, _, err = run(capsys, command, game_log, "-o", target)
        assert code == 2 and "is the event log itself" in err, (command, target, err)
    for option, target in (("--server-log", game_log), ("--server-log", f"{game_log}-wal"),
                           ("--keep-db", f"{game_log}-wal")):
        code, _, err = run(capsys, "redrive", game_log, "--app", "tests.replay_logs:make_game_server", option, target)
        assert code == 2 and "is the event log itself" in err, (option, target, err)
    assert open(game_log, "rb").read() == before
    assert len(replay.sessions(game_log)) == 2


def test_export_to_a_fifo_writes_into_it_and_leaves_it_a_fifo(game_log, tmp_path):
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    count = replay.export(game_log, fifo)
    reader.join(10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    lines = received[0].splitlines()
    assert len(lines) == count > 0 and orjson.loads(lines[0])["seq"] == 1


def test_export_to_a_symlink_writes_through_it_and_leaves_the_link(game_log, tmp_path):
    """Like -o /dev/stdout with stdout sent to a file: the events go to the file, the link stays a link."""
    target, link = tmp_path / "out.jsonl", tmp_path / "stdout"
    target.write_bytes(b"")
    link.symlink_to(target)
    count = replay.export(game_log, link)
    assert link.is_symlink() and len(target.read_bytes().splitlines()) == count > 0


def test_redrive_refuses_one_file_for_both_outputs_and_creates_nothing(game_log, tmp_path, capsys):
    target = tmp_path / "k.db"
    code, _, err = run(capsys, "redrive", game_log, "--keep-db", str(target), "--server-log", str(target))
    assert (code, err) == (2, "lobby replay redrive: --server-log and --keep-db name the same file\n")
    assert not target.exists()
    target.write_bytes(b"")
    code, _, err = run(capsys, "redrive", game_log, "--keep-db", str(target), "--server-log", str(tmp_path / "s.log"))
    assert code == 2 and "exists already" in err and not (tmp_path / "s.log").exists()


def test_an_output_that_is_a_directory_is_refused_by_its_name(game_log, tmp_path, capsys):
    for command in ("export", "html"):
        code, _, err = run(capsys, command, game_log, "-o", str(tmp_path))
        assert (code, err) == (2, f"lobby replay {command}: {tmp_path}: is a directory; give a file path\n")
        code, _, err = run(capsys, command, game_log, "-o", "")
        assert (code, err) == (2, f"lobby replay {command}: the output file is an empty path; give a file path\n")
    assert not list(tmp_path.glob("*.partial"))


def test_step_over_a_range_outside_the_session_says_which_seqs_it_has(game_log, capsys):
    """It said "(no events match)" and exit 0, where state and diff name the session's seqs."""
    last = replay.sessions(game_log)[-1]
    code, out, err = run(capsys, "step", game_log, "--from-seq", "1000", "--no-pause")
    assert (code, out, err) == (2, "", f"lobby replay step: from seq 1000: no event of session {last.session} "
                                       f"(seqs {last.first_seq}..{last.last_seq}; without -s, the last session)\n")
    code, out, err = run(capsys, "step", game_log, "-s", last.session, "--from-seq", "1000", "--no-pause")
    assert err.endswith(f"(seqs {last.first_seq}..{last.last_seq})\n")


def test_a_range_that_ends_before_it_starts_is_a_usage_error(game_log, tmp_path, capsys):
    """Bounds given the wrong way round are a mistake to say, not an empty answer."""
    for command, *extra in (("step", "--no-pause"), ("timeline",), ("export", "-o", tmp_path / "out.jsonl")):
        code, out, err = run(capsys, command, game_log, "--from-seq", "5", "--to-seq", "2", *extra)
        assert (code, out, err) == (2, "", f"lobby replay {command}: from seq 5 is after to seq 2\n")
    code, _, err = run(capsys, "timeline", game_log, "--since", "21:03", "--until", "21:02")
    assert (code, err) == (2, "lobby replay timeline: since 21:03 is after until 21:02\n")


def test_a_damaged_row_or_an_unknown_type_is_one_line_naming_its_seq(tmp_path, capsys):
    import sqlite3

    path = tmp_path / "damaged.db"
    ev = Events()
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("bob"), ev.link("bob"), ev.message("bob", {"type": "a/b"})])
    damage = sqlite3.connect(path)
    damage.execute("INSERT INTO types (name) VALUES ('vote')")
    damage.execute("INSERT INTO events (sid, at, type, username, data) "
                   "VALUES (1, 1, (SELECT code FROM types WHERE name = 'vote'), 'bob', '{}')")
    damage.commit()
    for command in ("timeline", "verify", "export"):
        code, _, err = run(capsys, command, path)
        assert code == 2 and "seq 5: cannot read this event (unknown event type 'vote')" in err, (command, err)
    damage.execute("UPDATE events SET data = '{not json' WHERE seq = 4")
    damage.execute("UPDATE events SET data = '[1]' WHERE seq = 1")
    damage.commit()
    damage.close()
    code, _, err = run(capsys, "timeline", path, "--from-seq", "2", "--to-seq", "4")
    assert code == 2 and "seq 4: cannot read this event" in err and "Traceback" not in err
    code, _, err = run(capsys, "verify", path)
    assert code == 2 and "seq 1: cannot read this event (data is not a JSON object" in err


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("at = 'yesterday'", "its time is not an integer: 'yesterday'"),
        ("at = at + 0.5", "its time is not an integer"),
        ("username = X'626f62'", "its username is not a string: b'bob'"),
        ("data = '{\"reason\":[1]}'", "its reason is not str: [1]"),
        ("data = '{\"reason\":7}'", "its reason is not str: 7"),
    ],
)
def test_a_row_whose_fields_have_the_wrong_types_is_one_line_naming_its_seq(tmp_path, capsys, change, problem):
    """Damaged rows failed later, as tracebacks (a time that is text in a comparison, a reason that is a list
    in a count), or were taken as they were (a time with a fraction)."""
    import sqlite3

    path = tmp_path / "damaged.db"
    ev = Events()
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join("bob"), ev.link("bob"), ev.unlink("bob"), ev.close()])
    with contextlib.closing(sqlite3.connect(path)) as damage:
        damage.execute(f"UPDATE events SET {change} WHERE seq = 4")
        damage.commit()
    for command, *extra in (("timeline",), ("verify",), ("stats",), ("export", "-o", tmp_path / "out.jsonl"),
                            ("html", "-o", tmp_path / "out.html"), ("state", "--at-seq", "5")):
        code, _, err = run(capsys, command, path, *extra)
        assert code == 2 and f"seq 4: cannot read this event ({problem}" in err and "Traceback" not in err, (
            command, err)


def test_a_page_that_does_not_read_is_one_line(tmp_path, capsys):
    """A garbled page in the middle of the log (a disk error): each command says the file cannot be read,
    in one line with exit 2."""
    path = garbled_log(tmp_path / "garbled.db")
    for command in ("timeline", "verify", "stats", "export"):
        code, out, err = run(capsys, command, path, *(["-o", tmp_path / "out.jsonl"] if command == "export" else []))
        assert code == 2 and err.count("\n") == 1, (command, err)
        assert err.startswith(f"lobby replay {command}: {path}: cannot be read: ") and "Traceback" not in err


def test_time_to_relink_after_a_crash_counts_from_the_crash(crash_log):
    """The recovery unlink is dated at the restart; bob was gone since the crashed session's last event."""
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    with EventStore.open_readonly(db) as store:
        relink = next(e for e in store.read(session=restarted.session) if e.type == "link" and e.username == "bob")
    report = replay.stats(db, restarted.session)
    assert report.sessions[0].users["bob"].relinks_us == [relink.at - crashed.last_at]
    assert crashed.last_at < restarted.start


def test_stats_of_every_session_needs_one_lobby(tmp_path, capsys):
    a, b = Events(lobby="a", session="sa"), Events(lobby="b", session="sb")
    path = tmp_path / "two.db"
    with EventStore(path) as store:
        store.append([a.listen(), b.listen(), a.join("bot1"), b.join("bot1")])
    code, _, err = run(capsys, "stats", path)
    assert code == 2 and "several lobbies" in err
    assert [s.summary.lobby for s in replay.stats(path, lobby="b").sessions] == ["b"]


def test_tables_show_control_characters_in_names_escaped(tmp_path, capsys):
    """An app may allow any username: one holding a newline forged a table row (a leave of admin that never
    happened); the JSON outputs were right already."""
    ev = Events()
    path = tmp_path / "odd.db"
    forged = "mallory\n     3  2026-11-28 09:00:00.000  leave      admin"
    with EventStore(path) as store:
        store.append([ev.listen(), ev.join(forged), ev.link("bidi\u202eevil"), ev.close()])
    code, out, _ = run(capsys, "timeline", path)
    assert code == 0 and len(out.splitlines()) == 5  # the header and four events
    assert "mallory\\n     3" in out and "bidi\\u202eevil" in out
    code, out, _ = run(capsys, "state", path, "--at-seq", 2)
    assert code == 0 and [line for line in out.splitlines() if "leave" in line] == [
        "  ○ mallory\\n     3  2026-11-28 09:00:00.000  leave      admin unlinked"
    ]
    code, out, _ = run(capsys, "timeline", path, "--json")
    assert orjson.loads(out.splitlines()[1])["username"] == forged


async def test_timeline_seen_by_is_what_the_users_client_was_sent(tmp_path, capsys):
    """Every frame bob's client received, derived from the log: other users' lifecycle while he is linked,
    broadcasts that did not skip him, sends to him, and his own link's burst, unlink and leave."""
    import asyncio

    from events.projection import Registry, apply
    from lobby import Server

    from .replay_logs import game_app
    from .wsclient import Raw

    server = game_app(Server(port=0, db=str(tmp_path / "lobby.db"), ping_interval=None))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/"
    received: list = []

    async def record(client: Raw) -> None:
        with contextlib.suppress(Exception):
            while True:
                received.append(orjson.loads(await client.ws.recv()))

    async def settle() -> None:  # everything sent so far has arrived: an echo to alice, and a pause
        await alice.echo()
        await asyncio.sleep(0.05)

    try:
        alice = await Raw.open(url)
        await alice.link("alice")
        bob = await Raw.open(url)
        recording = asyncio.create_task(record(bob))
        await bob.send({"type": "krmx/link", "payload": {"username": "bob", "version": "0.5.4"}})
        await settle()
        await alice.send({"type": "chat/say", "payload": "hi"})
        carol = await Raw.open(url)
        await carol.link("carol")
        server.broadcast({"type": "game/secret"}, skip="bob")
        server.broadcast({"type": "game/tick"}, skip="alice")
        await bob.send({"type": "test/echo", "payload": "bob's"})
        await settle()
        await bob.send({"type": "krmx/unlink"})
        await settle()
        await alice.send({"type": "chat/say", "payload": "bob cannot hear this"})
        await carol.send({"type": "krmx/leave"})
        await settle()
        await bob.send({"type": "krmx/link", "payload": {"username": "bob", "version": "0.5.4"}})
        await settle()
        server.kick("bob")
        await settle()
        recording.cancel()
    finally:
        await server.close()

    db = tmp_path / "lobby.db"
    log = open_log(db)
    registry = Registry()
    sent: list = []
    try:
        for event in log.read(1, log.upto):
            apply(registry, event)
            if event.seq not in {e.seq for e in replay.timeline(db, seen_by="bob", from_seq=event.seq, to_seq=event.seq)}:
                continue
            if event.type == "link" and event.username == "bob":  # accepted, then everyone in join order
                sent.append({"type": "krmx/accepted"})
                for name, linked in registry.users.items():
                    sent.append({"type": "krmx/joined", "payload": {"username": name}})
                    if linked:
                        sent.append({"type": "krmx/linked", "payload": {"username": name}})
            elif event.type in ("join", "link", "unlink", "leave") and (event.type, event.username) != ("join", "bob"):
                # (his own join's frame comes in his link's burst)
                frame = {"join": "krmx/joined", "link": "krmx/linked", "unlink": "krmx/unlinked", "leave": "krmx/left"}
                sent.append({"type": frame[event.type], "payload": {"username": event.username}})
            elif event.type in ("send", "broadcast"):
                sent.append(event.message)
    finally:
        log.close()
    assert len(received) > 12 and sent == received
    kinds = [e.type for e in replay.timeline(db, seen_by="bob")]
    assert kinds.count("message") == 1 and kinds[0] == "listen" and kinds[-1] == "close"  # what he did, the session
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "timeline", str(db), "-u", "bob", "--seen-by", "bob"])
    assert exit_.value.code == 2 and "argument --seen-by: not allowed with argument -u/--user" in capsys.readouterr().err
    code, out, _ = run(capsys, "timeline", db, "--seen-by", "bob", "-t", "broadcast")
    assert code == 0 and out.count("broadcast") == 2  # "hi" and the tick; not the secret, nor what he missed


def test_a_seq_range_past_the_end_or_outside_its_session_is_refused(game_log, capsys):
    """state, diff and step refused such seqs; timeline and export answered nothing, exit 0."""
    first, second = replay.sessions(game_log)[:2]
    last = second.last_seq
    for argv in (["timeline", game_log, "--from-seq", last + 1], ["export", game_log, "--from-seq", 99_999]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, "") and f"is past the end of the log (seqs 1..{last})" in err
    code, _, err = run(capsys, "timeline", game_log, "-s", first.session, "--from-seq", second.first_seq)
    assert code == 2 and f"are not in session {first.session} (seqs 1..{first.last_seq})" in err
    code, out, _ = run(capsys, "timeline", game_log, "--from-seq", last, "--to-seq", 99_999)  # to the end
    assert code == 0 and len(out.splitlines()) == 2


def test_state_in_the_gap_after_a_crash_says_the_server_was_down(crash_log, capsys):
    """Users linked when the server died show as linked until the next start's recovery: say so."""
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)[:2]
    between = crashed.last_at + (restarted.start - crashed.last_at) // 2
    point = replay.state(db, at_time=between)
    assert point.seq == crashed.last_seq and point.died_until == restarted.start
    assert point.registry.linked() == ["alice", "bob"]
    code, out, _ = run(capsys, "state", db, "--at-seq", crashed.last_seq)
    assert code == 0 and out.splitlines()[-1].startswith("the session ended here without a close (the server died)")
    code, out, _ = run(capsys, "state", db, "--at-seq", crashed.last_seq - 1, "--json")
    assert orjson.loads(out)["died_until"] is None


def test_export_takes_the_timelines_filters(game_log, capsys):
    """export had no user, type or time filter: `timeline --json` was the way round."""
    first = replay.sessions(game_log)[0].session
    code, out, _ = run(capsys, "export", game_log, "-s", first, "-u", "bob", "--since", "21:02", "--until", "21:03:02")
    assert code == 0 and [orjson.loads(line)["seq"] for line in out.splitlines()] == [10, 11, 12]
    code, out, _ = run(capsys, "export", game_log, "-t", "link", "--to-seq", "5")
    assert [orjson.loads(line)["username"] for line in out.splitlines()] == ["alice", "bob"]
    code, out, _ = run(capsys, "export", game_log, "--seen-by", "bob")
    seen = [orjson.loads(line) for line in out.splitlines()]
    assert [row["seq"] for row in seen] == [e.seq for e in replay.timeline(game_log, seen_by="bob")]
    assert any(row["type"] == "broadcast" for row in seen)
