"""Offline tools over krmx-lobby event logs: one function per ``lobby replay`` command.

Every function opens the log read-only (a running server may be writing it) and raises
``events.EventLogError`` for a missing, foreign or newer file and :class:`ReplayError` for an unknown
session or a bad argument. ``replay`` reads the same log and folds the same projection as the server,
and never imports ``lobby``.

    import replay
    for s in replay.sessions("lobby.db"):
        print(s.session, s.status)
    print(replay.state("lobby.db", at_time="2026-11-27T21:03:00Z").registry.as_list())
"""

from .export import export
from .html import html
from .logs import log_summary, logs
from .reader import ReplayError
from .redrive import redrive, redrive_async
from .sessions import sessions
from .state import diff, state, step
from .stats import stats
from .timeline import timeline
from .verify import verify

__all__ = [
    "ReplayError",
    "diff",
    "export",
    "html",
    "log_summary",
    "logs",
    "redrive",
    "redrive_async",
    "sessions",
    "state",
    "stats",
    "step",
    "timeline",
    "verify",
]
