"""Every replay command answers a missing file, a foreign database, an unknown session and bad arguments
with one clear line on stderr and exit code 2 (never a traceback); ``python -m replay`` is the same CLI."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

import replay
from lobby.cli import main
from replay.cli import main as replay_main

from .replay_logs import ROOT, crash_log, game_log  # noqa: F401 - fixtures

# command -> extra arguments it needs, and whether it takes --session
COMMANDS = {
    "sessions": ([], False),
    "timeline": ([], True),
    "show": ([], True),
    "state": ([], True),
    "diff": ([], True),
    "step": (["--no-pause"], True),
    "verify": ([], False),
    "html": (["-o", "-"], True),
    "stats": ([], True),
    "export": ([], True),
    "redrive": ([], True),
}


def run(capsys, argv):
    code = main(["replay", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def foreign_db(tmp_path):
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)")
    return path


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_file(command, tmp_path, capsys):
    extra, _ = COMMANDS[command]
    missing = tmp_path / "nothing.db"
    code, out, err = run(capsys, [command, missing, *extra])
    assert code == 2 and out == ""
    assert err == f"lobby replay {command}: {missing}: no such file\n"
    assert not missing.exists()  # a read-only open creates nothing


@pytest.mark.parametrize("command", COMMANDS)
def test_a_foreign_database(command, foreign_db, capsys):
    extra, _ = COMMANDS[command]
    before = foreign_db.read_bytes()
    code, out, err = run(capsys, [command, foreign_db, *extra])
    assert code == 2 and out == ""
    assert err.startswith(f"lobby replay {command}: {foreign_db}: is a database of another application")
    assert "orders" in err and err.count("\n") == 1
    assert foreign_db.read_bytes() == before


@pytest.mark.parametrize("command", [name for name, (_, takes) in COMMANDS.items() if takes])
def test_an_unknown_session(command, game_log, capsys):
    extra, _ = COMMANDS[command]
    code, out, err = run(capsys, [command, game_log, "-s", "nosuch", *extra])
    assert code == 2 and out == ""
    assert err.startswith(f"lobby replay {command}: {game_log}: unknown session 'nosuch' (the log has 2 sessions")
    assert "see 'lobby replay sessions'" in err


def test_logs_command_errors(game_log, crash_log, foreign_db, tmp_path, capsys):
    db, logfile = crash_log
    assert run(capsys, ["logs", tmp_path / "none.log", "--db", db])[2].endswith("none.log: no such log file\n")
    code, _, err = run(capsys, ["logs", logfile, "--db", foreign_db])
    assert code == 2 and "is a database of another application" in err
    code, _, err = run(capsys, ["logs", logfile, "--db", tmp_path / "none.db"])
    assert code == 2 and "no such file" in err
    code, _, err = run(capsys, ["logs", logfile, "--db", db, "-s", "nosuch"])
    assert code == 2 and "unknown session 'nosuch'" in err
    code, _, err = run(capsys, ["logs", logfile, "--db", db, "--around-seq", "5000"])
    assert code == 2 and "seq 5000 is not in the event log" in err


def test_bad_arguments(game_log, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["replay", "state", str(game_log), "--at-seq", "minus"])
    assert exit_.value.code == 2 and capsys.readouterr().err == (
        "lobby replay state: error: argument --at-seq: must be a whole number, 0 or more, not 'minus' "
        "(see lobby replay state --help)\n"
    )
    for flag, value in (("--window", "-1"), ("--around-seq", "x")):
        with pytest.raises(SystemExit) as exit_:
            main(["replay", "logs", "x.log", "--db", str(game_log), flag, value])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.endswith(f"must be a whole number, 0 or more, not {value!r} "
                                                "(see lobby replay logs --help)\n")
    code, _, err = run(capsys, ["state", game_log, "--at-time", "soon"])
    assert code == 2 and err.startswith("lobby replay state: cannot read time 'soon'")
    code, _, err = run(capsys, ["state", game_log, "--lobby", "attic"])
    assert code == 2 and "no lobby 'attic' in this log (lobbies: main)" in err
    for settle in ("0", "nan", "inf", "-1"):  # nan would report false differences, inf would wait forever
        code, _, err = run(capsys, ["redrive", game_log, "--settle", settle])
        assert code == 2 and "--settle must be a positive number of seconds" in err
    code, _, err = run(capsys, ["redrive", game_log, "--app", "json"])
    assert code == 2 and "--app must be module:attribute" in err
    assert run(capsys, [])[0] == 2  # `lobby replay` alone: the help, on stderr


def test_an_ambiguous_prefix_names_the_candidates(tmp_path, capsys):
    from events import EventStore

    from .factories import Events

    path = tmp_path / "two.db"
    with EventStore(path) as store:
        a, b = Events(session="abc1"), Events(session="abc2")
        store.append([a.listen(), a.close(), b.listen()])
    code, _, err = run(capsys, ["state", path, "-s", "abc"])
    assert code == 2 and "session 'abc' is ambiguous (main/abc1, main/abc2)" in err
    assert replay.state(path, session="abc2").registry.session == "abc2"


def test_a_broken_log_points_to_verify(tmp_path, capsys):
    from events import EventStore

    from .factories import Events

    ev = Events()
    path = tmp_path / "broken.db"
    with EventStore(path) as store:
        store.append([ev.listen(), ev.link("ghost")])
    code, _, err = run(capsys, ["state", path])
    assert code == 2 and "seq 2: link of unknown user 'ghost'" in err and "lobby replay verify" in err


def test_python_m_replay_is_the_same_cli(game_log, capsys):
    assert replay_main(["sessions", str(game_log), "--json"]) == 0
    assert capsys.readouterr().out.count("\n") == 2
    done = subprocess.run([sys.executable, "-m", "replay", "state", str(game_log) + ".missing"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.endswith("no such file\n") and "Traceback" not in done.stderr


def test_replay_never_imports_lobby():
    done = subprocess.run([sys.executable, "-c", "import sys, replay, replay.cli; print('lobby' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
