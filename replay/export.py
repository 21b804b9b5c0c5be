"""``lobby replay export``: a session, a seq range or the whole log as JSON lines (one event per line)."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from typing import IO

import orjson

from .reader import check_output, open_log, progress
from .render import event_json
from .timeline import Moment, select

__all__ = ["export"]


def export(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str] | IO[bytes] | None = None,
    *,
    session: str | None = None,
    lobby: str | None = None,
    users: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    since: Moment | None = None,
    until: Moment | None = None,
    from_seq: int | None = None,
    to_seq: int | None = None,
    seen_by: str | None = None,
) -> int:
    """Write the events of ``session`` (or of the seq range, or of the whole log), filtered as
    :func:`replay.timeline` filters them, to ``output`` (a path, a binary file, or standard output) as JSON lines:
    ``event.to_dict()`` plus an ISO ``time``. Returns how many events were written. A file path is written whole or not at all (a temporary file, then renamed);
    an existing FIFO, device or symlink is written through as it is."""
    if output is not None and not hasattr(output, "write"):
        check_output(path, output)  # type: ignore[arg-type]
    with open_log(path) as log:
        selection = select(log, session, lobby=lobby, users=users, types=types, since=since, until=until,
                           from_seq=from_seq, to_seq=to_seq, seen_by=seen_by)
        total = max(0, selection.to_seq - selection.from_seq + 1)
        events = progress(selection.read(log), total=total, description="exporting")
        if output is None:
            return _write(events, sys.stdout.buffer)
        if hasattr(output, "write"):
            return _write(events, output)  # type: ignore[arg-type]
        target = os.fspath(output)
        if os.path.lexists(target) and not stat.S_ISREG(os.lstat(target).st_mode):
            # A FIFO, a device, a symlink (/dev/stdout): written through, never replaced.
            with open(target, "wb") as handle:
                return _write(events, handle)
        partial = target + ".partial"
        try:
            try:
                handle = open(partial, "wb")
            except OSError as error:  # named by the path asked for, not by the temporary file's
                raise OSError(error.errno, error.strerror, target) from None
            with handle:
                count = _write(events, handle)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return count


def _write(events, handle: IO[bytes]) -> int:  # type: ignore[no-untyped-def]
    count = 0
    option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
    for event in events:
        handle.write(orjson.dumps(event_json(event), option=option))
        count += 1
    handle.flush()
    return count
