"""Structured logs: JSON lines on stderr by default, one line per fact, bound to lobby, session, seq and
username where they apply. Configure once, at the entry point."""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, Literal

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["configure_logging", "LOG_LEVELS"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(fmt: Literal["json", "console"] = "json", level: str = "info") -> None:
    """JSON lines (for machines, lnav, jq and ``lobby replay logs``) or coloured console lines (for people)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks without their frames' local variables: those hold auth strings and players' messages.
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        factory: object = lambda *args: _LineLogger(sys.stderr.buffer, b"\n")  # noqa: E731
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        processors = [*shared, renderer]
        factory = lambda *args: _LineLogger(sys.stderr, "\n")  # noqa: E731
    else:
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # websockets logs through the standard library: keep its warnings and errors, in the same stream.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _dumps(line: dict[str, Any], **_: Any) -> bytes:
    """A log line as JSON; a value orjson cannot write (an integer beyond 64 bits) becomes its ``repr``, so
    that logging a fact never raises where it is logged."""
    try:
        return orjson.dumps(line, default=repr)
    except TypeError:
        return orjson.dumps({key: _plain(value) for key, value in line.items()}, default=repr)


def _plain(value: Any) -> Any:
    try:
        orjson.dumps(value, default=repr)
    except TypeError:
        return repr(value)
    return value


class _LineLogger:
    """Writes each rendered line to a stream, and drops a line it cannot write: when stderr goes away (a pipe
    whose reader exited, a closed terminal), the lobby serves on without its log lines rather than fail in
    the middle of a turn."""

    __slots__ = ("_file", "_newline")

    def __init__(self, file: IO[Any], newline: Any) -> None:
        self._file = file
        self._newline = newline

    def msg(self, line: Any) -> None:
        try:
            self._file.write(line + self._newline)
            self._file.flush()
        except (OSError, ValueError):  # ValueError: the stream was closed
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg
