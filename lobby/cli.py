"""The ``lobby`` command: ``lobby serve [module:app]`` (and ``lobby replay ...``).

Every ``serve`` option is also an environment variable ``LOBBY_<OPTION>`` (``--ping-interval`` is
``LOBBY_PING_INTERVAL``); a flag wins over the variable, the variable over the app's own settings.
Usage errors exit with code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import Any

import structlog

from events import LobbyError
from replay.cli import Parser, add_replay_commands

from .config import parse_size
from .logs import LOG_LEVELS, configure_logging
from .server import Server

__all__ = ["main"]


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number")
    return value


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number") from None


def _port(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0..65535")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _listed(example: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in text.split(",") if part.strip())
        if not items:
            raise ValueError(f"must name at least one, like {example}")
        return items

    return parse


# (flag, config field, parser, help)
SERVE_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "interface to listen on (default 127.0.0.1)"),
    ("--port", "port", _port, "port to listen on (default 8082; 0 picks a free one)"),
    ("--db", "db", str, "event log file (default ./lobby.db)"),
    ("--durability", "durability", str, "full (default: fsync every commit) or normal (faster, may lose the "
     "last commits on power loss)"),
    ("--lobby", "lobby", str, "lobby name recorded with every event (default main)"),
    ("--path", "path", str, "websocket path (default /)"),
    ("--accept-new-users", "accept_new_users", _bool, "true (default) or false: only existing users may link"),
    ("--ping-interval", "ping_interval", _positive_float, "seconds between pings; a missed pong unlinks "
     "(default 15)"),
    ("--auth-timeout", "auth_timeout", _positive_float, "seconds an async authenticate may take (default 10)"),
    ("--max-frame-size", "max_frame_size", parse_size, "largest frame accepted, like 4MiB (default); larger ones "
     "close the connection"),
    ("--versions", "versions", _listed("0.5,0.6"), "accepted client version lines, comma separated (default 0.5,0.6)"),
    ("--compression", "compression", _bool, "permessage-deflate: false (default) or true"),
    ("--snapshot-every", "snapshot_every", _whole, "write a registry snapshot every N events (default 10000)"),
    ("--max-connections", "max_connections", _whole, "open connections at most; more get HTTP 503 (default 10000)"),
    ("--max-users", "max_users", _whole, "users at most; a link that would create one more is rejected (default 10000)"),
    ("--message-rate", "message_rate", _positive_float, "messages per second per connection on average; a "
     "flood is cut off (default 1000)"),
    ("--message-burst", "message_burst", _whole, "messages one connection may send at once (default 1000)"),
    ("--max-buffer", "max_buffer", parse_size, "bytes waiting for one slow reader at most before it is cut off "
     "(default 16MiB)"),
    ("--link-deadline", "link_deadline", _positive_float, "seconds a new connection has to link (default 60)"),
    ("--handshake-timeout", "handshake_timeout", _positive_float, "seconds a new socket has to finish its HTTP "
     "upgrade (default 10)"),
    ("--origins", "origins", _listed("https://game.example.com"), "web pages allowed to connect, comma separated, like "
     "https://game.example.com (default: any); requests without an Origin header (not browsers) are let in"),
    ("--trusted-proxies", "trusted_proxies", _listed("127.0.0.1,10.0.0.0/8"), "reverse proxies whose "
     "X-Forwarded-For names the client in log lines, comma separated addresses or networks, or * (default: none)"),
]


def _env_name(flag: str) -> str:
    return "LOBBY_" + flag.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lobby", description="krmx-lobby: an event-sourced Krmx lobby server")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run a lobby server",
        description="Run a Krmx lobby server. APP is module:attribute naming a lobby.Server (or a function "
        "returning one); without it, a plain lobby that only manages users. Every option is also an "
        "environment variable LOBBY_<OPTION>.",
    )
    serve.add_argument("app", nargs="?", help="module:attribute of the application, like examples.table:app")
    for flag, _field, _parse, help_text in SERVE_OPTIONS:
        serve.add_argument(flag, default=None, help=f"{help_text} [{_env_name(flag)}]")
    serve.add_argument("--log-format", default=None, help="json (default) or console [LOBBY_LOG_FORMAT]")
    serve.add_argument("--log-level", default=None, help="debug, info (default), warning, error, critical [LOBBY_LOG_LEVEL]")
    serve.add_argument(
        "--on-stop",
        default=None,
        help="what SIGINT, SIGTERM or SIGHUP does: close (default: every user kicked, the Krmx way) or keep (a deploy: "
        "users unlinked with reason 'server restart', back as unlinked on the next start) [LOBBY_ON_STOP]",
    )
    add_replay_commands(commands)
    return parser


class UsageError(Exception):
    """Exit 2 with one line on stderr: ``lobby: ...``, or the server's own log line that said it already."""

    def __init__(self, message: str, *, logged: bool = False) -> None:
        super().__init__(message)
        self.logged = logged


def _option(args: argparse.Namespace, flag: str, default: str | None = None) -> str | None:
    """The flag's value, else its variable's (set but empty, like ``LOBBY_PORT=$PORT`` without a PORT, is
    unset), else ``default``."""
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    if value is None:
        value = os.environ.get(_env_name(flag)) or None
    return default if value is None else value


def load_app(spec: str, option: str = "app") -> Server:
    """The ``lobby.Server`` that ``module:attribute`` names (or that the function it names returns)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"{option} must be module:attribute, like examples.table:app (got {spec!r})")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exit_:  # a script's sys.exit() at import: it would end the process without a word
        raise UsageError(f"module {module_name!r} called sys.exit({exit_.code!r}) while being imported") from None
    except Exception as error:  # not found, or the module itself failed while importing
        raise UsageError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    try:
        app = getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(app, Server) and callable(app):
        try:
            app = app()
        except Exception as error:
            raise UsageError(f"{spec}() failed (a factory takes no arguments): {type(error).__name__}: {error}") from None
    if not isinstance(app, Server):
        raise UsageError(f"{spec} is a {type(app).__name__}, not a lobby.Server")
    return app


def serve_command(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for flag, field, parse, _help in SERVE_OPTIONS:
        text = _option(args, flag)
        if text is None:
            continue
        try:
            overrides[field] = parse(text)
        except ValueError as error:
            raise UsageError(f"{flag} / {_env_name(flag)}: invalid value {text!r}: {error}") from None
    # Words in any case, as booleans are (LOBBY_LOG_LEVEL=INFO).
    log_format = _option(args, "--log-format", "json").lower()
    log_level = _option(args, "--log-level", "info").lower()
    on_stop = _option(args, "--on-stop", "close").lower()
    if log_format not in ("json", "console"):
        raise UsageError(f"--log-format / LOBBY_LOG_FORMAT must be json or console, not {log_format!r}")
    if log_level not in LOG_LEVELS:
        raise UsageError(f"--log-level / LOBBY_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {log_level!r}")
    if on_stop not in ("close", "keep"):
        raise UsageError(f"--on-stop / LOBBY_ON_STOP must be close or keep, not {on_stop!r}")
    configure_logging(log_format, log_level)  # type: ignore[arg-type]
    server = load_app(args.app) if args.app else Server()
    try:
        server.configure(**overrides)
    except ValueError as error:  # "max_buffer must be ...": said with the flags and variables that set it
        # The option it is about comes first; another one it names is followed by its value in brackets.
        named = {str(error).split(" ", 1)[0], *re.findall(r"(\w+) \(", str(error))}
        flags = [flag for flag, field, *_ in SERVE_OPTIONS if field in named and field in overrides]
        raise UsageError(" and ".join(f"{flag} / {_env_name(flag)}" for flag in flags) + f": {error}" if flags
                         else str(error)) from None
    try:
        return server.run(keep_users_on_stop=on_stop == "keep")
    except LobbyError as error:  # the log cannot be used: not ours, in use, or it does not fold
        problem = str(error)
    except socket.gaierror as error:  # a host name that does not resolve: a usage error, not a busy port
        problem = f"--host / LOBBY_HOST: cannot resolve {server.config.host!r}: {error.strerror}"
    except OSError as error:  # the port is taken, the address is not this machine's: the flags must change
        problem = f"cannot listen on {server.config.host}:{server.config.port}: {error}"
    if log_format == "json":  # said as every other line is: a JSON-only log pipeline would drop a plain one
        structlog.get_logger("lobby").critical("cannot start", error=problem)
    raise UsageError(problem, logged=log_format == "json")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a usage error, as for `lobby replay` alone
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return serve_command(args)
        return int(args.run(args))
    except UsageError as error:
        if not error.logged:
            print(f"lobby: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
