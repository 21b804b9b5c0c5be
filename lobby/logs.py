"""Structured logs: JSON lines on stderr by default, one line per fact, bound to lobby, session, seq and
username where they apply. Configure once, at the entry point."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson
import structlog

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
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory: object = structlog.BytesLoggerFactory(sys.stderr.buffer)
    elif fmt == "console":
        processors = [*shared, structlog.dev.ConsoleRenderer()]
        factory = structlog.PrintLoggerFactory(sys.stderr)
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
