"""The registry of a lobby at any seq, fast on big logs and always equal to a full fold.

The server writes a registry snapshot every 10,000 events (and at close), so usually the latest snapshot
at or before the point plus a fold of at most that many events answers (``EventStore.load_registry``).
When the nearest snapshot is further away (a log written before snapshots existed, or with a large
``--snapshot-every``), the fold is done once and checkpoints are kept every ``CHECKPOINT_EVERY`` events in
a sidecar file next to the log (``<log>.replay-index``, an SQLite file of its own): the log itself is
never written. Each checkpoint remembers the ``at`` of the event it stands on and the sidecar the first
event of the log, so a sidecar that does not belong to the log (the log was replaced) is ignored and
rebuilt. When the folder cannot be written, checkpoints live in memory for the rest of the process.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from events import InconsistentEvent, Registry, apply

from .reader import Log, progress

__all__ = ["CHECKPOINT_EVERY", "registry_at", "sidecar_path"]

#: The longest fold a point query does once the sidecar (or a snapshot) covers the log.
CHECKPOINT_EVERY = 10_000
SIDECAR_SUFFIX = ".replay-index"


def sidecar_path(log_path: str) -> str:
    return log_path + SIDECAR_SUFFIX


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    seq: int  # the registry's own seq: the last event of the lobby folded into it
    at: int  # at of that event, to recognise the log it was made from
    session: str | None
    closed: bool
    users: bytes

    def registry(self, lobby: str) -> Registry:
        """Raises ``ValueError`` for a checkpoint that does not read (a damaged sidecar)."""
        return Registry.saved(lobby, self.seq, self.session, self.closed, self.users)


class _Sidecar:
    """Checkpoints of one log, in the sidecar file when it can be written, else in memory."""

    #: By the log file itself (path and inode) and its fingerprint: logs made alike (the same first event, as
    #: tests make them) must not share checkpoints.
    _memory: dict[tuple[Any, ...], list[_Checkpoint]] = {}

    def __init__(self, log: Log) -> None:
        self.log = log
        self.conn: sqlite3.Connection | None = None
        self.fingerprint = self._fingerprint()
        real = os.path.realpath(log.path)
        try:
            stat = os.stat(real)
            self._file: tuple[Any, ...] = (real, stat.st_dev, stat.st_ino)
        except OSError:
            self._file = (real,)
        self._opened = False

    def _fingerprint(self) -> str:
        row = self.log.store.db.execute(
            "SELECT e.at, s.lobby, s.session FROM events e JOIN sessions s USING (sid) ORDER BY e.seq LIMIT 1"
        ).fetchone()
        return orjson.dumps(row).decode() if row else ""

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._opened:
            return self.conn
        conn = None
        try:
            conn = _connect(sidecar_path(self.log.path), create)
            conn.execute("PRAGMA busy_timeout = 2000")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(_CHECKPOINTS_TABLE)
            try:
                conn.execute("SELECT lobby, seq, at, session, closed, users FROM checkpoints LIMIT 0")
            except sqlite3.OperationalError:  # a damaged sidecar (derived data): made again from the log
                with conn:
                    conn.execute("DROP TABLE checkpoints")
                    conn.execute(_CHECKPOINTS_TABLE)
            row = conn.execute("SELECT value FROM meta WHERE key = 'log'").fetchone()
            if row is None or row[0] != self.fingerprint:
                with conn:
                    conn.execute("DELETE FROM checkpoints")
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('log', ?)", [self.fingerprint])
        except sqlite3.Error:
            if conn is not None:
                conn.close()
            conn = None
            if not create:
                return None  # no sidecar yet: not an error, nothing to read
        self.conn, self._opened = conn, True
        return conn

    def latest(self, lobby: str, seq: int) -> _Checkpoint | None:
        """The latest checkpoint of ``lobby`` at or before ``seq`` that still matches the log."""
        candidates: list[_Checkpoint] = []
        conn = self._open(create=False)
        if conn is not None:
            try:
                row = conn.execute(
                    "SELECT seq, at, session, closed, users FROM checkpoints WHERE lobby = ? AND seq <= ? "
                    "ORDER BY seq DESC LIMIT 1",
                    [lobby, seq],
                ).fetchone()
            except sqlite3.Error:  # a damaged sidecar: the log answers alone
                row = None
            if row is not None and type(row[0]) is int and type(row[1]) is int and type(row[4]) is bytes:
                candidates.append(_Checkpoint(row[0], row[1], row[2], bool(row[3]), row[4]))
        memory = [c for c in self._memory.get((*self._file, self.fingerprint, lobby), []) if c.seq <= seq]
        if memory:
            candidates.append(max(memory, key=lambda c: c.seq))
        for checkpoint in sorted(candidates, key=lambda c: -c.seq):
            found = self.log.store.db.execute("SELECT at FROM events WHERE seq = ?", [checkpoint.seq]).fetchone()
            if found is not None and found[0] == checkpoint.at:
                return checkpoint
        return None

    def save(self, lobby: str, checkpoints: list[_Checkpoint]) -> None:
        if not checkpoints:
            return
        conn = self._open(create=True)
        if conn is not None:
            try:
                with conn:
                    conn.executemany(
                        "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                        [(lobby, c.seq, c.at, c.session, int(c.closed), c.users) for c in checkpoints],
                    )
                return
            except sqlite3.Error:
                pass  # a read-only folder or file: keep them in memory instead
        self._memory.setdefault((*self._file, self.fingerprint, lobby), []).extend(checkpoints)

    def forget(self, lobby: str) -> None:
        """Drop the checkpoints of ``lobby`` (one did not read, or the log did not fold from it): made again."""
        self._memory.pop((*self._file, self.fingerprint, lobby), None)
        conn = self._open(create=False)
        if conn is not None:
            try:
                with conn:
                    conn.execute("DELETE FROM checkpoints WHERE lobby = ?", [lobby])
            except sqlite3.Error:  # a read-only sidecar keeps its damage: every query passes over it the same way
                return

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


_CHECKPOINTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS checkpoints (lobby TEXT NOT NULL, seq INTEGER NOT NULL, at INTEGER NOT NULL, "
    "session TEXT, closed INTEGER NOT NULL, users BLOB NOT NULL, PRIMARY KEY (lobby, seq))"
)


def _connect(path: str, create: bool) -> sqlite3.Connection:
    """The sidecar file; without ``create``, only if it exists already."""
    if create:
        return sqlite3.connect(path)
    return sqlite3.connect("file:" + quote(os.path.abspath(path)) + "?mode=rw", uri=True)


def _latest_snapshot(log: Log, lobby: str, seq: int) -> int:
    """The seq of the latest log snapshot of ``lobby`` at or before ``seq``, 0 when there is none."""
    if "snapshots" not in log.store.db.table_names():
        return 0
    row = log.store.db.execute(
        "SELECT max(seq) FROM snapshots WHERE lobby = ? AND seq <= ?", [lobby, seq]
    ).fetchone()
    return row[0] or 0


def _snapshot(log: Log, lobby: str, seq: int) -> Registry:
    """The log's snapshot of ``lobby`` at ``seq`` (an empty registry for 0)."""
    if seq == 0:
        return Registry()
    return log.store.load_registry(lobby, seq)  # the snapshot itself: nothing after it to fold


def registry_at(log: Log, lobby: str, seq: int) -> Registry:
    """The registry of ``lobby`` after every event with a seq up to ``seq``: equal to
    ``rebuild(log.read(1, seq, lobby=lobby))``, in at most about ``CHECKPOINT_EVERY`` folded events once
    snapshots or the sidecar cover the log. Raises ``events.InconsistentEvent`` for a log that does not fold."""
    seq = max(0, min(seq, log.upto))
    snapshot = _latest_snapshot(log, lobby, seq)
    if seq - snapshot <= CHECKPOINT_EVERY:
        registry = _snapshot(log, lobby, snapshot)
        return _fold(log, registry, lobby, (registry.seq or 0) + 1, seq)
    sidecar = _Sidecar(log)
    try:
        checkpoint = sidecar.latest(lobby, seq)
        if checkpoint is not None and checkpoint.seq >= snapshot:
            try:
                return _fold_from(log, sidecar, lobby, checkpoint.registry(lobby), seq)
            except (ValueError, InconsistentEvent):
                # Derived data that does not read or does not fold on: the log answers from its snapshot (and
                # says so, if the log itself does not fold), and the checkpoints are made again.
                sidecar.forget(lobby)
        return _fold_from(log, sidecar, lobby, _snapshot(log, lobby, snapshot), seq)
    finally:
        sidecar.close()


def _fold_from(log: Log, sidecar: _Sidecar, lobby: str, registry: Registry, seq: int) -> Registry:
    start = (registry.seq or 0) + 1
    if seq - start < CHECKPOINT_EVERY:
        return _fold(log, registry, lobby, start, seq)
    return _fold_keeping_checkpoints(log, sidecar, lobby, registry, start, seq)


def _fold(log: Log, registry: Registry, lobby: str, start: int, seq: int) -> Registry:
    for event in log.read(start, seq, lobby=lobby):
        apply(registry, event)
    return registry


def _fold_keeping_checkpoints(
    log: Log, sidecar: _Sidecar, lobby: str, registry: Registry, start: int, seq: int
) -> Registry:
    made: list[_Checkpoint] = []
    mark = start - 1 + CHECKPOINT_EVERY
    events = log.read(start, seq, lobby=lobby)
    for event in progress(events, total=seq - start + 1, description="indexing the log"):
        apply(registry, event)
        if event.seq >= mark:  # type: ignore[operator]
            made.append(
                _Checkpoint(event.seq, event.at, registry.session, registry.closed,  # type: ignore[arg-type]
                            orjson.dumps(list(registry.users.items())))
            )
            mark = event.seq + CHECKPOINT_EVERY  # type: ignore[operator]
    sidecar.save(lobby, made)
    return registry
