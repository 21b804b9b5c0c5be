"""Structured logs: JSON lines on stderr by default, one line per fact, bound to lobby, session, seq and
username where they apply. Configure once, at the entry point."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Any, Literal

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

__all__ = ["configure_logging", "LOG_LEVELS"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def configure_logging(fmt: Literal["json", "console"] = "json", level: str = "info") -> None:
    """JSON lines (for machines, lnav, jq and ``lobby replay logs``) or coloured console lines (for people)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # With stderr closed (``2>&-``: some init scripts start daemons so), Python has no sys.stderr: the lobby
    # serves on without its log lines, as it does when stderr goes away later.
    stream = sys.stderr if sys.stderr is not None else open(os.devnull, "w")  # noqa: SIM115
    # Tracebacks without their frames' local variables: those hold auth strings and players' messages.
    if fmt == "json":
        exceptions = structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        processors = [*shared, exceptions, structlog.processors.JSONRenderer(serializer=_dumps)]
        factory: object = lambda *args: _LineLogger(stream.buffer, b"\n")  # noqa: E731
        foreign = [exceptions, structlog.processors.JSONRenderer(serializer=_dumps_text)]
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        processors = [*shared, renderer]
        factory = lambda *args: _LineLogger(stream, "\n")  # noqa: E731
        foreign = [renderer]
    else:
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # websockets and asyncio log through the standard library: their warnings and errors go to the same
    # stream, rendered as the lobby's own lines (JSON lines stay JSON lines for jq and log shippers).
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *foreign],
        )
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler])  # unless the app configured logging itself


def _dumps(line: dict[str, Any], **_: Any) -> bytes:
    """A log line as JSON; a value orjson cannot write (an integer beyond 64 bits) becomes its ``repr``, so
    that logging a fact never raises where it is logged."""
    try:
        return orjson.dumps(line, default=repr)
    except TypeError:
        return orjson.dumps({key: _plain(value) for key, value in line.items()}, default=repr)


def _dumps_text(line: dict[str, Any], **_: Any) -> str:
    return _dumps(line).decode()


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
