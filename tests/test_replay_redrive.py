"""replay redrive: a session's client inputs sent to a fresh server; the first difference is reported."""

from __future__ import annotations

import glob
import os
import tempfile

import orjson
import pytest

import replay
from events import EventStore
from lobby import Server
from lobby.cli import main
from replay.redrive import plan_inputs

from .replay_logs import crash_log, game_log, make_game_server  # noqa: F401 - fixtures


def test_the_inputs_of_a_session_are_the_clients_doing(game_log):
    first = replay.sessions(game_log)[0]
    with EventStore.open_readonly(game_log) as store:
        old = list(store.read(session=first.session))
    plan = [(step.index + first.first_seq, step.action, step.username) for step in plan_inputs(old)]
    assert plan == [
        (2, "link", "alice"), (4, "link", "bob"), (6, "message", "alice"), (8, "message", "alice"),
        (10, "message", "bob"), (12, "drop", "bob"), (13, "link", "bob"), (14, "message", "alice"),
        (16, "link", "dave"), (18, "invalid", "dave"), (19, "link", "dave"), (20, "leave", "dave"),
        (22, "unlink", "alice"), (23, "link", "alice"), (24, "close", None),
    ]
    assert plan_inputs(old)[0].auth is True and plan_inputs(old)[1].auth is False
    assert plan_inputs(old)[-1].keep_users is True


async def test_the_same_app_records_the_same_events(game_log, crash_log):
    for session in replay.sessions(game_log):
        report = await replay.redrive_async(game_log, make_game_server(), session.session)
        assert report.ok, report.divergence.describe()
        assert report.new_events == report.old_events == session.events
    db, _ = crash_log
    crashed, restarted = replay.sessions(db)
    # The restart begins with the recovery of the crashed session: the new server recovers the same users.
    report = await replay.redrive_async(db, Server, restarted.session)
    assert report.ok and report.new_events == restarted.events
    report = await replay.redrive_async(db, Server, crashed.session)
    assert report.ok and report.new_events == crashed.events


def changed_app() -> Server:
    """A regression: the chat answer changed."""
    server = Server(ping_interval=None)

    @server.on("message")
    def on_message(username, message):
        if message["type"] == "chat/say":
            server.broadcast({"type": "chat/said", "payload": {"from": username, "text": message["payload"].upper()}})
        elif message["type"] == "admin/add-bot":
            server.join(message["payload"])
        elif message["type"] == "admin/kick":
            server.kick(message["payload"])

    return server


async def test_a_changed_app_is_caught_at_its_first_difference(game_log):
    first = replay.sessions(game_log)[0]
    report = await replay.redrive_async(game_log, changed_app, first.session, settle=0.5)
    assert not report.ok
    divergence = report.divergence
    assert (divergence.old.seq, divergence.old.type) == (7, "broadcast")
    assert divergence.old.message["payload"]["text"] == "hi bob"
    assert divergence.new.type == "broadcast" and divergence.new.message["payload"]["text"] == "HI BOB"
    assert [event.seq for event in divergence.before] == [4, 5, 6]
    assert "first difference at event #7" in divergence.describe()


async def test_an_app_that_no_longer_answers_shows_nothing_recorded(game_log):
    first = replay.sessions(game_log)[0]

    # The regression: a plain lobby, without the game's message listener.
    report = await replay.redrive_async(game_log, Server(ping_interval=None), first.session, settle=0.3)
    assert (report.divergence.old.seq, report.divergence.old.type) == (7, "broadcast")
    # A run of custom messages is compared once it ended: at bob's drop, the 9th event of the new log.
    assert report.divergence.new is None and report.new_events == 9
    assert "new: (nothing recorded)" in report.divergence.describe()


async def test_a_link_the_new_server_rejects_is_reported_with_its_reason(game_log):
    """The difference is "nothing recorded" where the old log has a link: the new server's reason for refusing
    it (an authenticate that changed, a token the redrive does not have) says why."""
    first = replay.sessions(game_log)[0]
    server = make_game_server()

    @server.on("authenticate")
    def bad_token(username, info):
        if username == "bob":
            raise PermissionError("bad token")

    report = await replay.redrive_async(game_log, server, first.session, settle=0.3)
    assert report.divergence.new is None and report.divergence.old.username == "bob"
    assert report.divergence.rejected == {"bob": "bad token"}
    assert "  the new server rejected the link of bob: bad token" in report.divergence.lines()
    assert report.to_dict()["divergence"]["rejected"] == {"bob": "bad token"}


def test_the_command_reports_and_exits_1_on_a_difference(game_log, tmp_path, capsys, monkeypatch):
    first = replay.sessions(game_log)[0]
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "regressed.py").write_text(
        "from tests.test_replay_redrive import changed_app\napp = changed_app\n"
    )
    args = ["replay", "redrive", str(game_log), "-s", first.session, "--settle", "0.5"]
    assert main([*args, "--app", "tests.replay_logs:make_game_server", "--keep-db", str(tmp_path / "new.db")]) == 0
    out = capsys.readouterr().out
    assert "no difference" in out and "15 client inputs" in out
    assert [s.events for s in replay.sessions(tmp_path / "new.db")][-1] == first.events
    assert main([*args, "--app", "regressed:app"]) == 1
    lines = capsys.readouterr().out.splitlines()  # the report's lines, one per line (not one escaped line)
    assert any(line.startswith("first difference at event #7") for line in lines)
    assert any(line.startswith("  old: ") for line in lines) and any(line.startswith("  new: ") for line in lines)
    assert main([*args, "--app", "regressed:app", "--json"]) == 1
    report = orjson.loads(capsys.readouterr().out)
    assert report["divergence"]["old"]["seq"] == 7 and report["divergence"]["new"]["message"]["payload"]["text"] == "HI BOB"
    assert main([*args, "--app", "nowhere:app"]) == 2
    assert "cannot import module 'nowhere'" in capsys.readouterr().err
    temporary = tempfile.gettempdir()
    before = set(glob.glob(os.path.join(temporary, "lobby-redrive-*")))
    assert main([*args, "--app", "tests.replay_logs:make_game_server", "--keep-db", str(tmp_path / "new.db")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert set(glob.glob(os.path.join(temporary, "lobby-redrive-*"))) == before  # nothing left behind


def greeting_app() -> Server:
    """Like the README's chat: every join is greeted before the link is recorded."""
    server = Server(ping_interval=None)

    @server.on("join")
    def greet(username):
        server.broadcast({"type": "chat/joined", "payload": username})

    return server


async def test_what_join_listeners_send_before_the_link_is_part_of_the_link(tmp_path):
    from .wsclient import Raw

    db = tmp_path / "greeting.db"
    server = greeting_app()
    server.configure(port=0, db=str(db))
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/"
    alice, bob = await Raw.open(url), await Raw.open(url)
    await alice.link("alice")
    await bob.link("bob")
    await alice.send({"type": "chat/say", "payload": "hi"})
    await alice.close()
    await bob.close()
    await server.close()
    with EventStore.open_readonly(db) as store:
        old = list(store.read())
    assert [e.type for e in old[1:4]] == ["join", "broadcast", "link"]
    assert [(step.index, step.action, step.username) for step in plan_inputs(old)][:2] == [
        (1, "link", "alice"), (4, "link", "bob"),
    ]
    report = await replay.redrive_async(db, greeting_app, settle=1.0)
    assert report.ok, report.divergence.describe()


def echo_app(shout: str | None = None) -> Server:
    """Answers each test/echo to its sender; ``shout``'s answers in capitals (a regression)."""
    server = Server(ping_interval=None)

    @server.on("message")
    def echo(username, message):
        text = message["payload"].upper() if username == shout else message["payload"]
        server.send(username, {"type": "test/echoed", "payload": text})

    return server


def test_messages_the_old_server_took_in_one_turn_compare_equal_when_sent_one_by_one(tmp_path):
    """The old server took three clients' messages in one turn (all three, then the three answers); the
    replay sends them one at a time. The runs compare equal; a changed answer is still caught."""
    from .factories import Events

    ev = Events()
    names = ["ann", "bo", "cy"]
    log = [ev.listen()]
    for name in names:
        log += [ev.join(name), ev.link(name)]
    log += [ev.message(name, {"type": "test/echo", "payload": f"hi {name}"}) for name in names]
    log += [ev.send(name, {"type": "test/echoed", "payload": f"hi {name}"}) for name in names]
    for name in names:  # what server.close() records
        log += [ev.unlink(name, "close"), ev.leave(name, "close")]
    log += [ev.close()]
    path = tmp_path / "one-turn.db"
    with EventStore(path) as store:
        store.append(log)
    report = replay.redrive(path, echo_app, settle=0.5)
    assert report.ok, report.divergence.describe()
    report = replay.redrive(path, lambda: echo_app(shout="bo"), settle=0.5)
    assert not report.ok
    assert (report.divergence.old.seq, report.divergence.old.type) == (12, "send")
    assert report.divergence.new.message == {"type": "test/echoed", "payload": "HI BO"}


def test_a_join_by_the_app_is_not_taken_for_a_later_link_of_that_user():
    """The app joined 'bot' and announced it in one turn; bot's client linked in a later turn: the link
    is an input of its own, at its own place."""
    from dataclasses import replace as with_at

    from .factories import Events

    ev = Events()
    log = [ev.listen(), ev.join("ann"), ev.link("ann")]
    app_turn = [ev.join("bot"), ev.broadcast({"type": "t/seat", "payload": "bot"})]
    log += [with_at(event, at=app_turn[0].at) for event in app_turn]
    log += [ev.link("bot")]
    assert [(step.index, step.action, step.username) for step in plan_inputs(log)] == [
        (1, "link", "ann"), (5, "link", "bot"),
    ]
    # The same events in one turn are one client input: the join listeners' broadcast sits in between.
    one_turn = [with_at(event, at=log[3].at) for event in log[3:]]
    assert [(s.index, s.action) for s in plan_inputs(log[:3] + one_turn)] == [(1, "link"), (3, "link")]


@pytest.mark.parametrize("reason", ["dropped", "ping timeout", "flood", "frame too large"])
def test_a_connection_that_went_away_is_replayed_as_a_drop(reason):
    """A keepalive that failed behind a client's own frames (flood) went away as a ping timeout did."""
    from .factories import Events

    ev = Events()
    log = [ev.listen(), ev.join("ann"), ev.link("ann"), ev.unlink("ann", reason)]
    assert [(step.index, step.action) for step in plan_inputs(log)] == [(1, "link"), (3, "drop")]


@pytest.mark.parametrize("limit", ["rate limit", "frame too large"])
async def test_a_connection_cut_off_by_a_limit_is_replayed_as_a_drop(tmp_path, limit):
    """The old log has the cut-off, then the unlink with its reason: both compare as the connection going
    away (a replay cannot reproduce the timing of a flood). A rate limit was a difference for an unchanged app."""
    from .wsclient import Raw

    db = tmp_path / "limits.db"
    server = echo_app()
    server.configure(port=0, db=str(db), message_rate=0.001, message_burst=3, max_frame_size=1024)
    await server.start()
    url = f"ws://127.0.0.1:{server.port}/"
    alice, bob = await Raw.open(url), await Raw.open(url)
    await alice.link("alice")
    await bob.link("bob")
    await alice.send({"type": "test/echo", "payload": "hi"})
    if limit == "rate limit":
        for _ in range(3):
            await bob.send({"type": "test/echo", "payload": "again"})
    else:
        await bob.send({"type": "test/echo", "payload": "x" * 2000})
    while not await bob.closed():
        pass
    await alice.close()
    await server.close()
    with EventStore.open_readonly(db) as store:
        assert [(e.type, e.reason) for e in store.read(types=["cutoff"])] == [("cutoff", limit)]
    report = await replay.redrive_async(db, echo_app, settle=1.0)
    assert report.ok, report.divergence.describe()
