"""`lobby serve` refuses bad input with one line and exit code 2, and one lobby of a log has one server."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import structlog

from events import EventLogError, EventStore
from lobby import Server, configure_logging
from lobby.cli import main

from .factories import Events, garbled_log
from .wsclient import ACCEPTED, Raw, joined, linked


@pytest.fixture(autouse=True)
def _logging_restored():
    """``lobby serve`` configures logging for the process, onto the streams capsys replaces: put it back."""
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    yield
    structlog.configure(**saved)
    logging.root.handlers[:] = handlers


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--link-deadline", "nan"),
        ("--handshake-timeout", "0"),
        ("--ping-interval", "nan"),
        ("--auth-timeout", "inf"),
        ("--message-rate", "nan"),
        ("--max-frame-size", "infk"),
        ("--max-buffer", "nanm"),
        ("--max-frame-size", "-1"),
        ("--db", ""),
        ("--lobby", ""),
        ("--host", ""),
        ("--versions", "abc"),
        ("--message-burst", "99999999999999999999999"),
        ("--max-connections", str(2**63)),
        ("--max-frame-size", "1e25"),
    ],
)
def test_bad_option_values_exit_2_with_one_line(tmp_path, capsys, flag, value):
    args = ["serve", "--port", "0", "--db", str(tmp_path / "lobby.db"), flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lobby: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "lobby.db").exists()


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--max-buffer", "1KiB", "max_buffer (1024 bytes) must be at least max_frame_size (4194304 bytes)"),
        # The flag the operator set is named, not the other one of the pair (a max-buffer never given).
        ("--max-frame-size", "32MiB", "max_buffer (16777216 bytes) must be at least max_frame_size (33554432 bytes)"),
        ("--path", "/game?v=1", "path must be a path, without a query or fragment"),
        ("--snapshot-every", "0", "snapshot_every must be"),
        ("--max-connections", "0", "max_connections must be"),
        ("--lobby", "", "lobby must be"),
        ("--durability", "bogus", "durability must be"),
    ],
)
def test_a_value_the_server_refuses_is_named_by_its_flag_and_variable(tmp_path, capsys, flag, value, words):
    """Values that parse but the configuration refuses were named by their field alone (max_buffer)."""
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "lobby.db"), flag, value]) == 2
    err = capsys.readouterr().err
    env = "LOBBY_" + flag[2:].replace("-", "_").upper()
    assert err.startswith(f"lobby: {flag} / {env}: {words}") and err.count("\n") == 1, err


@pytest.mark.parametrize("args", [["serve", "--port"], ["serve", "--bogus"], ["nosuch"], ["replay", "timeline"]])
def test_usage_errors_are_one_line_not_the_whole_usage(capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "error: " in err and "--help)" in err, err


@pytest.mark.parametrize(
    ("args", "help_of"),
    [(["serve", "--bogus"], "lobby serve"), (["replay", "timeline", "x.db", "--bogus"], "lobby replay timeline"),
     (["--bogus"], "lobby")],
)
def test_an_unknown_argument_points_to_the_help_of_its_command(capsys, args, help_of):
    """argparse reports unknown arguments from the top-level parser: it pointed to `lobby --help` for all."""
    with pytest.raises(SystemExit):
        main(args)
    assert capsys.readouterr().err == f"{help_of}: error: unrecognized arguments: --bogus (see {help_of} --help)\n"


def test_the_public_names_are_exported_for_type_checkers_too():
    """A game type-checked with mypy --strict: the packages are marked typed (PEP 561), and lobby's names, loaded
    when first used, are listed in a literal __all__ (a computed one reads as no export at all)."""
    import importlib.resources

    import lobby

    assert lobby.__all__ == sorted(lobby._HOMES)
    assert all(getattr(lobby, name) is not None for name in lobby.__all__)
    assert all(importlib.resources.files(package).joinpath("py.typed").is_file() for package in ("lobby", "events", "replay"))


def test_the_command_starts_light_and_ctrl_c_while_it_imports_is_quiet(monkeypatch):
    """Ctrl-C in the first half second of `lobby serve` (while websockets, sqlite-utils, structlog, ... were
    imported, before main() could catch it) printed a KeyboardInterrupt traceback."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, lobby.__main__; print(sorted({'lobby.server', 'websockets', "
         "'sqlite_utils', 'events'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent, check=True,
    )
    assert loaded.stdout == "[]\n"
    import builtins

    import lobby.__main__ as entry

    real_import = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1:
            raise KeyboardInterrupt
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert entry.main() == 130


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: lobby")


def test_a_port_in_use_exits_2_with_one_line(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--db", str(tmp_path / "lobby.db")]) == 2
    [line] = capsys.readouterr().err.splitlines()  # as the log's other lines are: JSON by default
    assert orjson.loads(line)["error"].startswith(f"cannot listen on 127.0.0.1:{port}: ")


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("LOBBY_PORT", "abc", "--port / LOBBY_PORT: invalid value 'abc': must be a whole number"),
        ("LOBBY_SNAPSHOT_EVERY", "1.5", "--snapshot-every / LOBBY_SNAPSHOT_EVERY: invalid value '1.5': must be a whole"),
        ("LOBBY_LOG_FORMAT", "xml", "--log-format / LOBBY_LOG_FORMAT must be json or console, not 'xml'"),
        ("LOBBY_LOG_LEVEL", "loud", "--log-level / LOBBY_LOG_LEVEL must be one of"),
        ("LOBBY_ON_STOP", "pause", "--on-stop / LOBBY_ON_STOP must be close or keep, not 'pause'"),
    ],
)
def test_a_bad_value_is_named_by_its_flag_and_variable_in_our_words(tmp_path, capsys, monkeypatch, variable, value,
                                                                     said):
    """Python's own words ("invalid literal for int() with base 10") and a flag alone for a variable's value."""
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--db", str(tmp_path / "lobby.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lobby: {said}") and err.count("\n") == 1, err


def test_bad_option_values_from_the_environment_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOBBY_LINK_DEADLINE", "nan")
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "lobby.db")]) == 2
    assert "LOBBY_LINK_DEADLINE" in capsys.readouterr().err


def test_sizes_take_binary_units(tmp_path, monkeypatch):
    """4MiB, 64k and 1GiB are sizes; the parsed values reach the server's configuration."""
    seen = {}
    monkeypatch.setattr(Server, "run", lambda self, **_: _record(seen, self))
    args = ["serve", "--port", "0", "--db", str(tmp_path / "x.db"), "--max-frame-size", "64k", "--max-buffer", "1GiB"]
    assert main(args) == 0
    assert (seen["max_frame_size"], seen["max_buffer"]) == (64 * 1024, 1024**3)


def test_origins_are_a_comma_separated_list(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(Server, "run", lambda self, **_: _record(seen, self))
    args = ["serve", "--port", "0", "--db", str(tmp_path / "x.db"), "--origins", "https://a.example, https://B.example:8443"]
    assert main(args) == 0
    assert seen["origins"] == ("https://a.example", "https://b.example:8443")
    monkeypatch.setenv("LOBBY_ORIGINS", "a.example")
    assert main(["serve", "--port", "0", "--db", str(tmp_path / "x.db")]) == 2
    assert capsys.readouterr().err.startswith("lobby: --origins / LOBBY_ORIGINS: origins must be a list of web origins")


def _record(seen: dict, server: Server) -> int:
    seen.update(vars(server.config))
    return 0


def test_a_variable_set_but_empty_counts_as_unset(tmp_path, monkeypatch):
    """``LOBBY_PORT=$PORT`` without a PORT: the default, as for every variable (the port was an error, the log
    level was not)."""
    seen = {}
    monkeypatch.setattr(Server, "run", lambda self, **_: _record(seen, self))
    for name in ("LOBBY_PORT", "LOBBY_MAX_BUFFER", "LOBBY_LOG_LEVEL", "LOBBY_ON_STOP", "LOBBY_DURABILITY"):
        monkeypatch.setenv(name, "")
    assert main(["serve", "--db", str(tmp_path / "x.db")]) == 0
    assert (seen["port"], seen["max_buffer"], seen["durability"]) == (8082, 16 * 1024**2, "full")


@pytest.mark.parametrize(
    "options",
    [
        {"link_deadline": math.nan},
        {"ping_interval": math.inf},
        {"auth_timeout": math.nan},
        {"message_rate": math.nan},
        {"port": "80"},
        {"port": True},
        {"max_frame_size": 4096.5},
        {"max_frame_size": "64KB"},
        {"max_buffer": "lots"},
        {"snapshot_every": 2**63},
        {"versions": "0.6"},
        {"versions": ()},
        {"versions": ("abc",)},
        {"versions": ("0.5.4",)},
        {"versions": ("٠.٦",)},
        {"lobby": ""},
        {"db": None},
        {"accept_new_users": "false"},
        {"compression": "no"},
        {"username_predicate": "x"},
        {"query_params": ["token"]},
        {"query_params": {"token": 5}},
        {"query_params": {"": True}},
    ],
    ids=repr,
)
def test_bad_options_in_code_raise_a_clear_value_error(tmp_path, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=name):
        Server(**{"db": str(tmp_path / "lobby.db"), **options})


def test_the_readme_example_of_options_in_code_is_taken(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Server(port=9000, db="game.db", max_frame_size="64KiB").config
    assert (config.port, config.db, config.max_frame_size) == (9000, "game.db", 64 * 1024)


def test_sizes_in_code_take_binary_units_as_flags_do(tmp_path):
    config = Server(db=str(tmp_path / "lobby.db"), max_frame_size="64KiB", max_buffer="1.5MiB").config
    assert (config.max_frame_size, config.max_buffer) == (64 * 1024, 1536 * 1024)


def test_run_logs_json_lines_on_stderr_and_keeps_users_when_asked(tmp_path):
    """``app.run()`` logs as ``lobby serve`` does (JSON on stderr, info), and ``keep_users_on_stop`` is
    ``--on-stop keep``: SIGTERM closes with reason ``server restart``."""
    db = tmp_path / "lobby.db"
    script = "import sys; from lobby import Server; sys.exit(Server(port=0, db=sys.argv[1]).run(keep_users_on_stop=True))"
    process = subprocess.Popen([sys.executable, "-c", script, str(db)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        lines = []
        while not any(b"serving until" in line for line in lines):
            line = process.stderr.readline()
            assert line, b"".join(lines)  # it exited before serving
            lines.append(line)
        process.send_signal(signal.SIGTERM)
        out, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and out == b""
    logged = [orjson.loads(line) for line in [*lines, *rest.splitlines()]]
    assert {line["level"] for line in logged} == {"info"}
    assert [line["event"] for line in logged][-1] == "closed"
    with EventStore.open_readonly(db) as store:
        assert [event.reason for event in store.read(types=["close"])] == ["server restart"]


def _serving(process: subprocess.Popen) -> list[dict]:
    """The JSON lines a server process wrote until it serves."""
    lines: list[bytes] = []
    while not any(b"serving until" in line for line in lines):
        line = process.stderr.readline()
        assert line, b"".join(lines)  # it exited before serving
        lines.append(line)
    return [orjson.loads(line) for line in lines if line.startswith(b"{")]  # nohup may say a word first


def test_sighup_closes_the_krmx_way_like_sigterm(tmp_path):
    """The terminal a server runs in closed: it closes (close logged), exits 0, and says which signal."""
    db = tmp_path / "lobby.db"
    script = "import sys; from lobby import Server; sys.exit(Server(port=0, db=sys.argv[1]).run())"
    process = subprocess.Popen([sys.executable, "-c", script, str(db)], stderr=subprocess.PIPE,
                               cwd=Path(__file__).resolve().parent.parent)
    try:
        assert _serving(process)[-1]["signals"] == ["SIGINT", "SIGTERM", "SIGHUP"]
        process.send_signal(signal.SIGHUP)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    stopping = [orjson.loads(line) for line in rest.splitlines() if b'"stopping"' in line]
    assert [line["signal"] for line in stopping] == ["SIGHUP"]
    with EventStore.open_readonly(db) as store:
        assert [event.reason for event in store.read(types=["close"])] == ["close"]


SLOW_CLOSE_APP = """
import asyncio, sys
from lobby import Server
app = Server(port=0, db=sys.argv[1])

@app.on("close")
async def save_game():
    await asyncio.sleep(60)

sys.exit(app.run())
"""


def test_a_second_stop_signal_stops_waiting_for_listeners(tmp_path):
    """Ctrl-C, then Ctrl-C again: the close does not wait out the grace for a slow async listener."""
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLOSE_APP, str(tmp_path / "lobby.db")],
                               stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        _serving(process)
        process.send_signal(signal.SIGINT)
        while b'"closed"' not in (line := process.stderr.readline()) and b'"close"' not in line:
            assert line
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and time.monotonic() - started < 5  # the grace is 10 s
    events = [orjson.loads(line)["event"] for line in rest.splitlines()]
    assert events == ["stop signal while closing: not waiting for listeners", "listener cancelled at close", "closed"]


STUCK_LISTENER_APP = """
import asyncio, sys
import lobby.server
from lobby import Server
lobby.server.LISTENER_GRACE = lobby.server.LISTENER_CANCEL_GRACE = 0.2
app = Server(port=0, db=sys.argv[1])

@app.on("close")
async def never_stops():
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            continue  # the bug under test: every cancellation is swallowed

sys.exit(app.run())
"""


def test_a_stop_signal_after_close_ends_a_process_a_stuck_listener_keeps(tmp_path):
    """close() goes on without a listener that ignores its cancellation, but the loop's shutdown waits for it
    for ever: the process says so, and the next stop signal ends it (the log is closed by then)."""
    db = tmp_path / "lobby.db"
    process = subprocess.Popen([sys.executable, "-c", STUCK_LISTENER_APP, str(db)],
                               stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        _serving(process)
        process.send_signal(signal.SIGTERM)
        while b"listeners still running after close" not in (line := process.stderr.readline()):
            assert line
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert b"stop signal after close: exiting without the listeners still running" in rest
    with EventStore.open_readonly(db) as store:
        assert [event.type for event in store.read()][-1] == "close"


EMBEDDED_APP = """
import asyncio, os, signal, sys
from lobby import Server

async def main():
    server = Server(port=0, db=sys.argv[1])
    serving = asyncio.ensure_future(server.serve())
    while server.status != "listening":
        await asyncio.sleep(0.05)

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    server.store.append = broken  # the log fails: the server stops by itself
    try:
        server.join("zed")
    except Exception:
        pass
    print("serve returned", await serving, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.sleep(5)

try:
    asyncio.run(main())
except KeyboardInterrupt:
    print("the app handled its own Ctrl-C", flush=True)
"""


def test_once_serve_returns_an_embedding_apps_signals_are_its_own_again(tmp_path):
    """serve() in an app's own loop: after it returned (here after a failure of the log), a Ctrl-C is the
    app's: not swallowed by a stale handler, and never a process exit of the server's."""
    result = subprocess.run([sys.executable, "-c", EMBEDDED_APP, str(tmp_path / "lobby.db")], capture_output=True,
                            timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.decode().endswith("serve returned 1\nthe app handled its own Ctrl-C\n"), result


def test_under_nohup_sighup_is_still_ignored(tmp_path):
    """``nohup lobby serve &``: a server meant to outlive its terminal does not close on SIGHUP."""
    db = tmp_path / "lobby.db"
    script = "import sys; from lobby import Server; sys.exit(Server(port=0, db=sys.argv[1]).run())"
    process = subprocess.Popen(["nohup", sys.executable, "-c", script, str(db)], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert _serving(process)[-1]["signals"] == ["SIGINT", "SIGTERM"]  # what stops it, as it is started
        process.send_signal(signal.SIGHUP)
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=1)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert [orjson.loads(line)["signal"] for line in rest.splitlines() if b'"stopping"' in line] == ["SIGTERM"]


def test_a_server_whose_stderr_went_away_serves_on(tmp_path):
    """`lobby serve 2>&1 | head`: once the reader of its log lines exits, every line is a broken pipe. The
    server drops those lines and serves on (it stopped in the middle of a turn: a join without its link)."""
    db = tmp_path / "lobby.db"
    process = subprocess.Popen([sys.executable, "-m", "lobby", "serve", "--port", "0", "--db", str(db)],
                               stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        port = next(line["port"] for line in _serving(process) if line["event"] == "listening")
        process.stderr.close()  # the reader is gone: the server's next line breaks the pipe

        async def link_two() -> list:
            alice = await Raw.open(f"ws://127.0.0.1:{port}/")
            bob = await Raw.open(f"ws://127.0.0.1:{port}/")
            burst = [await alice.link("alice"), await bob.link("bob")]
            await alice.expect(joined("bob"), linked("bob"))
            return burst

        assert asyncio.run(asyncio.wait_for(link_two(), 10)) == [
            [ACCEPTED, joined("alice"), linked("alice")],
            [ACCEPTED, joined("alice"), linked("alice"), joined("bob"), linked("bob")],
        ]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    with EventStore.open_readonly(db) as store:
        assert [event.type for event in store.read()][-5:] == ["unlink", "leave", "unlink", "leave", "close"]


def test_a_server_started_with_stderr_closed_serves(tmp_path):
    """``lobby serve 2>&-`` (some init scripts start daemons so): Python has no sys.stderr; the server serves
    without its log lines."""
    db = tmp_path / "lobby.db"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = f'exec "$0" -m lobby serve --port {port} --db "$1" 2>&-'
    process = subprocess.Popen(["sh", "-c", command, sys.executable, str(db)], cwd=Path(__file__).resolve().parent.parent)
    try:
        for _ in range(300):
            assert process.poll() is None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    assert orjson.loads(response.read())["status"] == "listening"
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("not serving")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    with EventStore.open_readonly(db) as store:
        assert [event.type for event in store.read()] == ["listen", "close"]


def test_standard_library_log_records_are_json_lines_too():
    """websockets and asyncio log through the standard library: their lines, tracebacks included, are JSON
    lines like the lobby's (a plain-text traceback in the stream breaks jq and log shippers)."""
    script = (
        "import logging; from lobby import configure_logging; configure_logging()\n"
        "try:\n    {}['missing']\n"
        "except KeyError:\n    logging.getLogger('websockets.server').exception('process_request failed')\n"
        "logging.getLogger('asyncio').warning('slow %s', 'callback')\n"
        "logging.getLogger('asyncio').info('not shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert [(line["event"], line["logger"], line["level"]) for line in lines] == [
        ("process_request failed", "websockets.server", "error"), ("slow callback", "asyncio", "warning"),
    ]
    assert lines[0]["exception"][0]["exc_type"] == "KeyError" and all("timestamp" in line for line in lines)


def test_logged_tracebacks_hold_no_local_variables(capsys):
    """A listener that fails with an auth string or a player's message in a local variable: the traceback
    names the frames, never their variables (tracebacks with locals would put secrets in the log)."""
    configure_logging("json")

    def authenticate(username, auth="TOKEN-1234"):
        raise KeyError("no such key file")

    try:
        authenticate("alice")
    except KeyError:
        structlog.get_logger().exception("listener failed")
    err = capsys.readouterr().err
    assert "authenticate" in err and "KeyError" in err
    assert "TOKEN-1234" not in err


def test_console_lines_have_colours_on_a_terminal_only(capsys):
    configure_logging("console")
    structlog.get_logger().info("linked", username="alice")
    err = capsys.readouterr().err
    assert "linked" in err and "alice" in err and "\x1b[" not in err  # captured: not a terminal


def test_the_critical_level_logs_only_what_stops_the_server(capsys):
    """The server logs a failure of its event log at critical: an app may keep only those lines."""
    configure_logging("json", "critical")
    structlog.get_logger().error("listener failed")
    structlog.get_logger().critical("event log append failed")
    assert [orjson.loads(line)["event"] for line in capsys.readouterr().err.splitlines()] == ["event log append failed"]


def test_a_value_the_json_log_cannot_hold_is_logged_as_its_repr(capsys):
    configure_logging("json")
    structlog.get_logger().info("big", count=10**30, nested={"n": 2**70}, plain=1)
    line = orjson.loads(capsys.readouterr().err)
    assert (line["count"], line["nested"], line["plain"]) == (str(10**30), repr({"n": 2**70}), 1)


def test_good_query_rules_and_predicates_are_taken(tmp_path):
    server = Server(db=str(tmp_path / "lobby.db"), accept_new_users=False, username_predicate=str.isalpha,
                    query_params={"a": True, "b": False, "c": "x", "d": lambda value: value == "1"})
    assert server.config.query_params["c"] == "x"


@pytest.mark.parametrize("event", ["authenticate", "join"])
def test_a_listener_that_is_not_a_function_is_refused_at_registration(tmp_path, event):
    server = Server(db=str(tmp_path / "lobby.db"))
    with pytest.raises(ValueError, match=f"{event} listener must be a function"):
        server.on(event, "not a function")
    with pytest.raises(ValueError, match="must be a function"):
        server.on(event)(5)


APP_MODULE = """
from lobby import Server

def needs_a_port(port):
    return Server()

def broken():
    raise RuntimeError("no config file")
"""


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("..relative:app", "cannot import module"),
        ("failing_at_import:app", "RuntimeError: boom"),
        ("syntax_error:app", "SyntaxError"),
        ("factories_mod:needs_a_port", "needs_a_port() failed"),
        ("factories_mod:broken", "no config file"),
        ("os:system", "os:system() failed"),
        ("exiting_at_import:app", "called sys.exit(3) while being imported"),
    ],
)
def test_an_app_that_cannot_be_loaded_exits_2_with_one_line(tmp_path, capsys, monkeypatch, spec, words):
    (tmp_path / "factories_mod.py").write_text(APP_MODULE)
    (tmp_path / "failing_at_import.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "syntax_error.py").write_text("def (:\n")
    (tmp_path / "exiting_at_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["serve", spec, "--port", "0", "--db", str(tmp_path / "lobby.db")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lobby: ") and words in err and "Traceback" not in err


async def test_a_second_server_on_the_same_lobby_of_a_log_is_refused(tmp_path):
    """Two servers appending one lobby would interleave two sessions; another lobby of the log is fine,
    and the lobby is free again once its server stopped."""
    db = str(tmp_path / "lobby.db")
    first = Server(port=0, db=db, ping_interval=None)
    await first.start()
    try:
        second = Server(port=0, db=db, ping_interval=None)
        with pytest.raises(EventLogError, match="lobby 'main' is in use by another server"):
            await second.start()
        other = Server(port=0, db=db, lobby="other", ping_interval=None)
        await other.start()
        await other.close()
    finally:
        await first.close()
    third = Server(port=0, db=db, ping_interval=None)
    await third.start()
    await third.close()


def test_serve_on_a_lobby_in_use_exits_2(tmp_path, capsys):
    db = tmp_path / "lobby.db"
    with EventStore(db) as holder:
        holder.claim("main")
        assert main(["serve", "--port", "0", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "in use by another server" in err and "Traceback" not in err


def test_serve_on_a_log_with_a_page_that_does_not_read_exits_2(tmp_path, capsys):
    path = garbled_log(tmp_path / "garbled.db")
    assert main(["serve", "--port", "0", "--db", str(path), "--log-format", "console"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lobby: {path}: ") and err.count("\n") == 1 and "Traceback" not in err


def test_serve_on_a_log_that_does_not_fold_exits_2_and_names_verify(tmp_path, capsys):
    db = tmp_path / "lobby.db"
    ev = Events()
    with EventStore(db) as store:
        store.append([ev.listen(), ev.link("ghost")])  # a link of a user who never joined
    assert main(["serve", "--port", "0", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "does not fold" in err and "seq 2" in err and "lobby replay verify" in err and "Traceback" not in err


async def test_a_cancelled_start_releases_the_lobby(tmp_path, monkeypatch):
    """A start cancelled while it opens the socket (a slow name lookup, a timeout around it) undoes
    itself: the same server can start again, and so can another one on the lobby."""
    import asyncio

    import lobby.server

    real_serve = lobby.server.serve

    async def slow_serve(*args, **kwargs):
        await asyncio.sleep(10)

    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None)
    monkeypatch.setattr(lobby.server, "serve", slow_serve)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(server.start(), 0.2)
    assert server.status == "initializing"
    monkeypatch.setattr(lobby.server, "serve", real_serve)
    await server.start()
    await server.close()


async def test_a_failing_closing_snapshot_still_closes_and_releases_the_lobby(tmp_path, monkeypatch):
    db = str(tmp_path / "lobby.db")
    server = Server(port=0, db=db, ping_interval=None)
    await server.start()
    monkeypatch.setattr(server.store, "save_snapshot", _disk_full)
    await server.close()
    assert server.status == "closed"
    again = Server(port=0, db=db, ping_interval=None)
    await again.start()
    assert again.core.registry.closed is False and again.core.registry.session == again.session
    await again.close()


def _disk_full(registry) -> None:
    raise OSError(28, "No space left on device")


def test_db_may_be_a_path_and_host_none_or_a_list(tmp_path):
    from pathlib import Path

    assert Server(db=Path(tmp_path) / "x.db").config.db == str(Path(tmp_path) / "x.db")
    assert Server(db=str(tmp_path / "x.db"), host=None).config.host is None
    assert Server(db=str(tmp_path / "x.db"), host=["127.0.0.1", "::1"]).config.host == ["127.0.0.1", "::1"]
    with pytest.raises(ValueError, match="host"):
        Server(db=str(tmp_path / "x.db"), host=[""])


def test_words_are_read_in_any_case(tmp_path, monkeypatch):
    """LOBBY_LOG_LEVEL=INFO was refused, while --compression TRUE was taken."""
    seen = {}
    monkeypatch.setattr(Server, "run", lambda self, **_: _record(seen, self))
    monkeypatch.setenv("LOBBY_LOG_LEVEL", "WARNING")
    assert main(["serve", "--db", str(tmp_path / "x.db"), "--on-stop", "Keep", "--log-format", "JSON"]) == 0
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING


def test_a_start_that_fails_says_why_in_the_json_log_too(tmp_path, capsys):
    """With JSON logs (the default), the one line saying why a service does not start was plain text: a JSON-only
    log pipeline dropped it, and a crash-looping service said nothing."""
    missing = tmp_path / "nope" / "lobby.db"
    assert main(["serve", "--db", str(missing)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    record = orjson.loads(line)
    assert (record["event"], record["level"]) == ("cannot start", "critical")
    assert record["error"] == f"{missing}: folder {str(missing.parent)!r} does not exist"
    assert main(["serve", "--db", str(missing), "--log-format", "console"]) == 2
    assert capsys.readouterr().err == f"lobby: {record['error']}\n"
