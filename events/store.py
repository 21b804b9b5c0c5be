"""The event log: one SQLite table of events, owned through sqlite-utils.

- Schema through sqlite-utils ``Migrations`` (set ``krmx-lobby``); the schema version is the number of
  migrations applied. ``PRAGMA application_id`` marks the file as ours, so another application's
  database is recognised and never touched.
- WAL journal; ``durability="full"`` by default: every commit is durable (in WAL mode ``NORMAL`` may roll
  back committed transactions after a power loss), ``durability="normal"`` to trade that for speed. The
  connection runs at ``synchronous=NORMAL`` and FULL's one extra step, an fsync of the WAL after a
  commit, is the store's own: right after the commit, or once for several (``append(sync=False)`` then
  :meth:`EventStore.sync`).
- ``append`` writes a batch in one transaction (group commit) and assigns gapless, increasing seqs.
  Rows are small (the type is a one-byte code, spelled out by the ``types`` table and the ``log`` view)
  and a batch goes in as few multi-row ``INSERT`` statements, letting SQLite number the rows.
- Reads are lazy iterators over a cursor: the log is never loaded whole.
- ``EventStore.open_readonly`` reads a file while a server writes it (WAL readers see whole transactions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import orjson

try:
    import fcntl
except ImportError:  # Windows: no claim on a lobby (see EventStore.claim)
    fcntl = None  # type: ignore[assignment]

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .errors import EventLogError
from .model import EVENT_TYPES, LIFECYCLE_TYPES, Event, encode_data_column, event_from_fields
from .projection import Registry, rebuild

__all__ = ["EventStore", "SessionInfo", "APPLICATION_ID", "SCHEMA_VERSION", "MEMORY"]

#: ``PRAGMA application_id`` of our logs: "KRMX" in ASCII.
APPLICATION_ID = 0x4B524D58
MEMORY = ":memory:"
Durability = Literal["full", "normal"]

migrations = Migrations("krmx-lobby")


@migrations()
def m001_events(db: Database) -> None:
    # One row per session, so event rows stay small (a session id, not two strings) and reads by session
    # walk a seq range of the primary key: the events table needs no secondary index, which keeps appends
    # fast. first_seq/last_seq are kept up to date by every append.
    db.execute(_M001_SESSIONS_TABLE)
    # Event types by a small code, so each event row stores one byte instead of the type's name. Codes are
    # never reused or renumbered; a type this table lacks is added when first appended.
    db.execute(_M001_TYPES_TABLE)
    db.conn.executemany("INSERT INTO types (code, name) VALUES (?, ?)", enumerate(_M001_TYPES, 1))
    db.execute(_M001_EVENTS_TABLE)
    db.execute(_M001_LOG_VIEW)


# m001's schema, fixed forever (shared with _repair_type_names, which brings the first builds' logs to it).
#: The types m001 numbers, in code order (1, 2, ...), whatever EVENT_TYPES becomes.
_M001_TYPES = ("listen", "join", "link", "message", "send", "broadcast", "unlink", "leave", "close")
_M001_SESSIONS_TABLE = """CREATE TABLE sessions (
    sid INTEGER PRIMARY KEY,
    lobby TEXT NOT NULL,
    session TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    UNIQUE (lobby, session)
)"""
_M001_TYPES_TABLE = "CREATE TABLE types (code INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)"
_M001_EVENTS_TABLE = """CREATE TABLE events (
    seq INTEGER PRIMARY KEY,
    sid INTEGER NOT NULL REFERENCES sessions (sid),
    at INTEGER NOT NULL,
    type INTEGER NOT NULL REFERENCES types (code),
    username TEXT,
    data BLOB
)"""
# For people with the sqlite3 shell: the log with lobby, session and type spelled out.
_M001_LOG_VIEW = """CREATE VIEW log AS
SELECT e.seq, s.lobby, s.session, e.at, t.name AS type, e.username, e.data
FROM events e JOIN sessions s USING (sid) JOIN types t ON t.code = e.type"""


def _file_state(path: str) -> tuple[Any, ...]:
    """What changes when a writer opens or writes a log: its file, its size and time, its -wal file."""
    try:
        status = os.stat(path)
    except OSError:
        return ()
    return status.st_ino, status.st_size, status.st_mtime_ns, os.path.exists(os.path.realpath(path) + "-wal")


def _identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fsdecode(path):
        raise TypeError(f"an event log's path is a non-empty str or path, not {path!r}")
    return os.fsdecode(path)


def _readable(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("PRAGMA application_id").fetchone()
    except sqlite3.OperationalError:
        return False
    except sqlite3.DatabaseError:
        return True  # not SQLite: said with its own message
    return True


def _has_type_names(db: Database) -> bool:
    """Whether this log was written by the first builds (2026-11-27, for minutes), whose m001 stored each
    event's type name in ``events.type``, with no ``types`` table (and, in the very first, the lobby and
    session in every row, with no ``sessions`` table)."""
    if "events" not in db.table_names():
        return False
    declared = {column.name: column.type for column in db["events"].columns}  # type: ignore[union-attr]
    return declared.get("type", "").upper() == "TEXT"


def _repair_type_names(db: Database) -> None:
    """Bring a log of the first builds to m001's schema (type codes, session ids), keeping every event as it is."""
    per_row_sessions = "sid" not in {column.name for column in db["events"].columns}  # type: ignore[union-attr]
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DROP VIEW IF EXISTS log")
        conn.execute("ALTER TABLE events RENAME TO events_with_type_names")
        sid = "e.sid"
        if per_row_sessions:
            for (index,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND "
                                         "tbl_name = 'events_with_type_names' AND sql IS NOT NULL").fetchall():
                conn.execute(f"DROP INDEX [{index}]")
            conn.execute(_M001_SESSIONS_TABLE)
            conn.execute("INSERT INTO sessions (lobby, session, first_seq, last_seq) SELECT lobby, session, "
                         "min(seq), max(seq) FROM events_with_type_names GROUP BY lobby, session ORDER BY min(seq)")
            sid = "(SELECT s.sid FROM sessions s WHERE s.lobby = e.lobby AND s.session = e.session)"
        conn.execute(_M001_TYPES_TABLE)
        conn.executemany("INSERT INTO types (code, name) VALUES (?, ?)", enumerate(_M001_TYPES, 1))
        conn.execute("INSERT INTO types (name) SELECT type FROM events_with_type_names "
                     "WHERE type NOT IN (SELECT name FROM types) GROUP BY type ORDER BY min(seq)")
        conn.execute(_M001_EVENTS_TABLE)
        conn.execute("INSERT INTO events (seq, sid, at, type, username, data) "
                     f"SELECT e.seq, {sid}, e.at, t.code, e.username, e.data "
                     "FROM events_with_type_names e JOIN types t ON t.name = e.type ORDER BY e.seq")
        conn.execute("DROP TABLE events_with_type_names")
        conn.execute(_M001_LOG_VIEW)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


@migrations()
def m002_snapshots(db: Database) -> None:
    # Registry snapshots, so that start-up folds only the tail of the log. Derived data: a log without
    # snapshots (written before this migration) folds from its first event and gives the same registry.
    db["snapshots"].create(  # type: ignore[union-attr]
        {"lobby": str, "seq": int, "session": str, "closed": int, "users": bytes},
        pk=("lobby", "seq"),
        not_null={"lobby", "seq", "closed", "users"},
    )


@migrations()
def m003_type_codes_only(db: Database) -> None:
    # The first builds (type names, not codes) recognise m001 and m002 and would write on into a log of ours,
    # type names into the type column, rows the rest of this code cannot read; they refuse a migration they do
    # not know, so this one keeps them out. Rows such a build wrote already are converted, as a first build's
    # log is. (A trigger refusing such rows for good would cost a third more CPU per append.)
    conn = db.conn
    # Names only of types this build knows (the first builds wrote no other): any other text is damage.
    known = ", ".join("'" + name + "'" for name in EVENT_TYPES)
    conn.execute(f"INSERT INTO types (name) SELECT type FROM events WHERE typeof(type) = 'text' AND type IN ({known}) "
                 "AND type NOT IN (SELECT name FROM types) GROUP BY type ORDER BY min(seq)")
    conn.execute("UPDATE events SET type = (SELECT code FROM types WHERE name = events.type) "
                 "WHERE typeof(type) = 'text' AND type IN (SELECT name FROM types)")
    stray = conn.execute("SELECT seq, quote(type) FROM events WHERE type NOT IN (SELECT code FROM types) "
                         "OR typeof(type) != 'integer' LIMIT 1").fetchone()
    if stray is not None:
        raise EventLogError(
            f"is damaged: seq {stray[0]} has the type {stray[1]}, which is not one of the log's event types; "
            "refusing to write to it (`lobby replay verify` lists every problem)"
        )


_KNOWN_MIGRATIONS = [m.name for m in migrations._migrations]
SCHEMA_VERSION = len(_KNOWN_MIGRATIONS)


def _how_to_convert(path: str) -> str:
    """How a log holding type names becomes readable (a first build must not write on into it: see m003)."""
    return ("stop the server writing it, then open it once for writing with this krmx-lobby (`lobby serve` on it, or "
            f"`python3 -c \"import events; events.EventStore({path!r}).close()\"`), which converts it; no event is lost")


#: Bytes of write-ahead log kept after a checkpoint (a long reader can grow it far beyond; see __init__).
WAL_SIZE_LIMIT = 64 * 1024 * 1024

_COLUMNS = "seq, sid, at, type, username, data"
#: Rows per INSERT statement at most; a batch goes in as chunks of power-of-two sizes (1024 + 512 + ... + 1),
#: so that a handful of statement shapes serve every batch size and each is prepared once (sqlite3 caches it).
#: SQLite before 3.32 binds at most 999 parameters per statement, later ones 32766 (5 per row).
_MAX_CHUNK = min(1024, 1 << (((32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999) // 5).bit_length() - 1))
_INSERT_CHUNKS: dict[tuple[int, bool, bool], str] = {}
_UPDATE_LAST = "UPDATE sessions SET last_seq = ? WHERE sid = ?"


#: Per event class, whether its username is required (an optional one may be None, otherwise a string).
_NEEDS_USERNAME: dict[type, bool] = {
    cls: any(f.name == "username" and f.default is dataclasses.MISSING for f in dataclasses.fields(cls))
    for cls in EVENT_TYPES.values()
}


#: The event classes with a username field (a direct read is cheaper than getattr with a default).
_WITH_USERNAME = {cls for cls in EVENT_TYPES.values() if "username" in {f.name for f in dataclasses.fields(cls)}}
_INT = {int}
_NONE = type(None)
_STR_OR_NONE = {str, _NONE}


def _unreadable(events: Sequence[object]) -> str:
    """Which of ``events`` a refused batch names, and why: the first that is not an event, or whose time is
    not an integer, or whose username is missing or not a string."""
    for event in events:
        needs_username = _NEEDS_USERNAME.get(type(event))
        if needs_username is None:
            return f"{event!r:.100}: not one of the event types ({', '.join(EVENT_TYPES)})"
        if type(getattr(event, "at", None)) is not int:
            return f"{event!r:.100}: at must be UTC microseconds as an integer"
        username = getattr(event, "username", None)
        if type(username) is not str and (needs_username or username is not None):
            return f"{event!r:.100}: username must be a string"
    raise AssertionError("no unreadable event")  # pragma: no cover - called when there is one


def _unprefixed(error: BaseException, seq: int) -> str:
    text = str(error) or type(error).__name__
    return text.removeprefix(f"seq {seq}: ")


def _insert_sql(rows: int, one_type: bool, one_session: bool) -> str:
    """The INSERT of ``rows`` events whose parameters are, row by row, ``at``, ``username``, ``data``, then
    ``type`` and ``sid``; but a batch of ``one_type`` (of ``one_session``) binds its type (session id) once,
    after all rows' (binds cost: 2048 fewer are a tenth of the INSERT's time for a batch of 1024)."""
    sql = _INSERT_CHUNKS.get((rows, one_type, one_session))
    if sql is None:
        width = 5 - one_type - one_session
        once = itertools.count(width * rows + 1)
        type_once, sid_once = one_type and f"?{next(once)}", one_session and f"?{next(once)}"
        values = []
        for first in range(1, width * rows + 1, width):
            own = itertools.count(first + 3)
            type_ = type_once or f"?{next(own)}"
            sid = sid_once or f"?{next(own)}"
            values.append(f"({sid}, ?{first}, {type_}, ?{first + 1}, ?{first + 2})")
        sql = "INSERT INTO events (sid, at, type, username, data) VALUES " + ", ".join(values)
        _INSERT_CHUNKS[rows, one_type, one_session] = sql
    return sql


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One run of a lobby, from its ``listen`` to its ``close`` (or to the crash that ended it)."""

    lobby: str
    session: str
    first_seq: int
    last_seq: int
    start: int
    last_at: int
    #: ``at`` of the ``close`` event; ``None`` when the session ended without close (a crash) or still runs.
    end: int | None
    users: int
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return self.end is not None

    @property
    def events(self) -> int:
        return sum(self.counts.values())


class EventStore:
    """An event log in one SQLite file (or in memory with ``":memory:"``).

    >>> store = EventStore(":memory:")
    >>> store.append([...])  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str] = MEMORY, *, durability: Durability = "full") -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        self.path = _path(path)
        self.readonly = False
        self.durability = durability
        if self.path != MEMORY:
            try:
                self._check_path(Path(self.path))
            except OSError as error:  # a folder this user may not enter, a name too long, ...
                raise EventLogError(f"{self.path}: cannot be used: {error.strerror or error}") from None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False)
        except sqlite3.Error as error:
            raise EventLogError(f"{self.path}: cannot open: {error}") from None
        self.db = Database(conn, execute_plugins=False)
        self._sids: dict[tuple[str, str], int] = {}
        self._unsynced = False
        self._wal_fd: int | None = None
        self._lock_fds: list[int] = []
        self._sessions_by_sid: dict[int, tuple[str, str]] = {}
        self._codes: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._class_codes: dict[type, int] = {}  # the codes of _codes, by event class, for append
        try:
            self._check_identity()
            self._migrate()
            self._check_end()
            self._load_types()
            unknown = sorted(name for name in self._codes if name not in EVENT_TYPES)
            if unknown:
                # A newer krmx-lobby adds types without a migration: a fold without its events (a user its new
                # event took out, say) would be wrong, and what this one appends after them would not fold.
                raise EventLogError(
                    f"{self.path}: holds events of types this krmx-lobby does not know ({', '.join(unknown)}), "
                    "written by a newer krmx-lobby; upgrade krmx-lobby to write to it"
                )
            if self.path != MEMORY:
                self.db.enable_wal()
                # A reader that runs long (an export of a big log) makes the WAL grow, as it must keep what
                # the reader sees; once the reader is done, the next checkpoint cuts it back to this size.
                self.db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self.db.execute("PRAGMA synchronous=NORMAL")  # FULL's fsync of the WAL: see append and sync
            # Where the file is, whatever the working directory becomes (an app may chdir after its start).
            self._where = os.path.abspath(self.path) if self.path != MEMORY else MEMORY
            self._identity = _identity(self._where) if self.path != MEMORY else (0, 0)
        except sqlite3.Error as error:
            self.db.close()
            raise EventLogError(f"{self.path}: {error}") from None
        except EventLogError:
            self.db.close()
            raise

    def _check_path(self, target: Path) -> None:
        """Refuse, with a reason, a path SQLite would open wrongly or fail on later."""
        if target.is_dir():
            raise EventLogError(f"{self.path}: is a directory, not an event log")
        if target.exists() and not target.is_file():
            raise EventLogError(f"{self.path}: is not a regular file (a device, a pipe), not an event log")
        orphan = f"{os.path.realpath(target)}-wal"
        if not target.exists() and os.path.exists(orphan) and os.path.getsize(orphan) > 0:
            # A log moved or deleted under a running server (a WAL never folded back): SQLite would throw its
            # events away with the new log it starts here.
            raise EventLogError(
                f"{self.path}: does not exist, but {orphan!r} does: it holds the last events of the log that was "
                "there (moved or deleted while a server wrote to it). Put the log back at this path to keep them "
                "(a server folds them in), or delete that file to start a new log"
            )
        if not target.parent.exists():
            raise EventLogError(f"{self.path}: folder {str(target.parent)!r} does not exist")
        links = target.stat().st_nlink if target.exists() else 1
        if links > 1:
            # SQLite keeps the WAL beside each name: two servers (or a server and a reader) through two
            # names would not see each other's writes, and the lobby lock is beside the name too.
            raise EventLogError(
                f"{self.path}: has {links} hard links; SQLite does not support a database "
                "with several names (writes through each would corrupt it): keep one, copy instead of linking"
            )
        if not target.exists() and not os.access(target.parent, os.W_OK | os.X_OK):
            raise EventLogError(
                f"{self.path}: cannot be created: folder {str(target.parent)!r} is not writable for this user"
            )
        for companion in (f"{os.path.realpath(target)}-wal", f"{os.path.realpath(target)}-shm"):
            if os.path.exists(companion) and not os.access(companion, os.W_OK):
                # Left by another user's server (root's, killed): SQLite would fail at the first write.
                raise EventLogError(f"{self.path}: its {companion!r} is read-only for this user")
        if target.exists() and not os.access(target, os.W_OK):
            # SQLite would open it read-only and fail at the first append, after a server is listening.
            raise EventLogError(
                f"{self.path}: is read-only for this user; writing the log needs write access to it "
                "(to read it, `lobby replay` opens it read-only)"
            )

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> EventStore:
        """Open an existing log for reading only; works while a server writes the same file."""
        self = cls.__new__(cls)
        self.path = _path(path)
        self.readonly = True
        self.migrated = []
        self.durability = "full"
        if not Path(self.path).exists():
            raise EventLogError(f"{self.path}: no such file")
        if Path(self.path).is_dir():
            raise EventLogError(f"{self.path}: is a directory, not an event log")
        uri = f"file:{quote(os.path.abspath(self.path))}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            if not _readable(conn) and not os.path.exists(os.path.realpath(self.path) + "-wal"):
                # A reader of a WAL log needs its -shm file, which it cannot create where it may not write (a
                # log owned by the service user, a read-only copy). With no -wal file, no server has the log
                # open and all of it is in the file: read it as immutable, which needs neither.
                conn.close()
                conn = sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False)
                # Immutable is a promise that the file does not change while it is read: a server that starts
                # on the log meanwhile breaks it, and SQLite would read on, silently short (check_unchanged).
                self._where = os.path.abspath(self.path)
                self._immutable = _file_state(self._where)
        except sqlite3.Error as error:
            raise EventLogError(f"{self.path}: cannot open: {error}") from None
        self.db = Database(conn, execute_plugins=False)
        self._sids = {}
        self._unsynced = False
        self._wal_fd = None
        self._lock_fds = []
        self._sessions_by_sid = {}
        self._codes = {}
        self._names = {}
        self._class_codes = {}
        try:
            if not self._check_identity():
                raise EventLogError(f"{self.path}: is empty, not an event log")
            # An older log stays readable as it is: a read-only open never migrates (snapshots are optional).
            if _has_type_names(self.db):
                raise EventLogError(
                    f"{self.path}: was written by a first build of krmx-lobby (type names, not codes) and needs "
                    f"converting: {_how_to_convert(self.path)}"
                )
        except sqlite3.Error as error:
            self.db.close()
            raise EventLogError(f"{self.path}: {error}") from None
        except EventLogError:
            self.db.close()
            raise
        return self

    # -- opening ----------------------------------------------------------------------------------------

    def _check_identity(self) -> bool:
        """Raise unless this is our log or an empty database; return whether it is ours already."""
        try:
            app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
            tables = self.db.table_names()
        except sqlite3.OperationalError as error:  # not a damaged file: locked, read-only, no permission, ...
            if "locked" in str(error):
                raise EventLogError(f"{self.path}: is locked by another process ({error})") from None
            raise EventLogError(
                f"{self.path}: cannot open it ({error}); check the permissions of the file and of its folder "
                "(SQLite keeps the -wal and -shm files beside the log)"
            ) from None
        except sqlite3.DatabaseError as error:
            if getattr(error, "sqlite_errorname", "SQLITE_NOTADB") == "SQLITE_NOTADB":
                raise EventLogError(f"{self.path}: not an SQLite database ({error})") from None
            raise EventLogError(
                f"{self.path}: cannot be read: {error} (`sqlite3 {self.path} .recover` copies out what can be)"
            ) from None
        if app_id == APPLICATION_ID and set(tables) <= {"_sqlite_migrations"} and not migrations.applied(self.db):
            # Its first open stopped between marking it ours and creating the tables (sqlite-utils commits its
            # migrations table before the first migration): still new.
            return False
        if app_id == APPLICATION_ID:
            applied = [m.name for m in migrations.applied(self.db)]
            unknown = [name for name in applied if name not in _KNOWN_MIGRATIONS]
            if unknown:
                raise EventLogError(
                    f"{self.path}: schema version {len(applied)} is newer than this krmx-lobby supports "
                    f"(version {SCHEMA_VERSION}; unknown migrations: {', '.join(unknown)}); upgrade krmx-lobby"
                )
            needed = ["_sqlite_migrations", "events"]
            if not _has_type_names(self.db):  # a first build's log (converted on write) has neither
                needed += ["sessions", "types"]
            missing = [name for name in needed if name not in tables]
            if missing:
                raise EventLogError(
                    f"{self.path}: is not a complete krmx-lobby event log (no {', '.join(missing)} table); "
                    "refusing to touch it"
                )
            return True
        if app_id != 0:
            raise EventLogError(
                f"{self.path}: is a database of another application (application_id {app_id:#x}); "
                "refusing to touch it"
            )
        if tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise EventLogError(
                f"{self.path}: is a database of another application (tables: {shown}); refusing to touch it"
            )
        return False

    def _check_end(self) -> None:
        """Raise if the last event is not where the sessions say the log ends: a damaged last page hides the
        events on it, and a server would number new events over them."""
        last, recorded = self.db.conn.execute(
            "SELECT (SELECT max(seq) FROM events), (SELECT max(last_seq) FROM sessions)"
        ).fetchone()
        if last != recorded:
            raise EventLogError(
                f"{self.path}: is damaged: its last event is seq {last} but its sessions go to seq {recorded}; "
                f"refusing to write to it (`sqlite3 {self.path} .recover` copies out what can be read)"
            )

    def _migrate(self) -> None:
        repaired = _has_type_names(self.db)
        if repaired:
            _repair_type_names(self.db)
        pending = migrations.pending(self.db)
        if pending:
            with self.db.atomic():
                self.db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            try:
                migrations.apply(self.db)
            except EventLogError as error:  # a migration's refusal, rolled back with it
                raise EventLogError(f"{self.path}: {error}") from None
        #: The migrations this open applied (an older log upgraded, or a new log created), for the server's log.
        self.migrated = ["m001_events (type codes)"] * repaired + [migration.name for migration in pending]

    def claim(self, lobby: str) -> None:
        """Take ``lobby`` of this log for this store alone until :meth:`close`: two servers appending one
        lobby's events to one log would interleave two sessions and leave a log that does not fold.

        The lock is an advisory ``flock`` on a file beside the log (``<log>-<lobby>.lock``, holding the
        owner's pid), which the system releases when the process ends, however it ends. Raises
        :class:`EventLogError` if another store (in this process or another) holds it."""
        if self.readonly:
            raise EventLogError(f"{self.path}: opened read-only, cannot claim a lobby")
        if self.path == MEMORY or fcntl is None:  # nothing to share an in-memory log with; no flock on Windows
            return
        name = quote(lobby, safe="")
        if len(name) > 64:
            name = hashlib.sha256(lobby.encode()).hexdigest()[:32]
        # Beside the real file: two paths to one log (a symlink per release, say) must meet at one lock.
        lock_path = f"{os.path.realpath(self.path)}-{name}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise EventLogError(f"{self.path}: cannot create the lock file {lock_path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            owner = f" (pid {holder})" if holder.isdigit() else ""
            raise EventLogError(f"{self.path}: lobby {lobby!r} is in use by another server{owner}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fds.append(fd)

    def check_unchanged(self) -> None:
        """Raise :class:`EventLogError` if a log opened read-only as immutable (from a folder the reader cannot
        write to, with no server on it) changed since: what was read from it may be incomplete."""
        opened = getattr(self, "_immutable", None)
        if opened is not None and _file_state(self._where) != opened:
            raise EventLogError(
                f"{self.path}: changed while it was read (a server opened it meanwhile): what was read may be "
                "incomplete, so no answer is given; run the command again as a user who may write to the log's "
                "folder (a running server's log is read so), or once the server stopped"
            )

    def check_file(self) -> None:
        """Raise :class:`EventLogError` if the log's file is no longer the one at its path (deleted, or replaced
        by another file, under a running server): what is appended would go where no one can open it again."""
        if self.path == MEMORY or self.readonly:
            return
        try:
            identity = _identity(self._where)
        except FileNotFoundError:
            raise EventLogError(f"{self.path}: was moved or deleted while the log was open") from None
        if identity != self._identity:
            raise EventLogError(f"{self.path}: was replaced by another file while the log was open")

    def checkpoint(self) -> bool:
        """Fold the write-ahead file into the log's file, the one this store has open wherever it is now: a log
        moved under a running server keeps its last events (SQLite skips that at close once its file moved).
        Without waiting: False when a reader holds part of it back (its events stay in the -wal file)."""
        self.db.execute("PRAGMA busy_timeout=0")
        busy, frames, folded = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy and frames == folded

    def close(self) -> None:
        if getattr(self, "_wal_fd", None) is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        for fd in getattr(self, "_lock_fds", ()):
            os.close(fd)  # releases the claim
        self._lock_fds = []
        self.db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "readonly" if self.readonly else self.durability
        return f"<EventStore {self.path} ({mode})>"

    # -- writing ----------------------------------------------------------------------------------------

    def append(self, events: Sequence[Event], *, sync: bool = True) -> list[int]:
        """Append ``events`` in one transaction; return the seqs assigned to them, in order.

        With ``sync=False`` (``full`` durability only), the transaction is committed without its fsync:
        it is visible and survives the process, and the next :meth:`sync` (or synced append) makes it
        durable against a power loss too. A server commits the stages of one turn this way and syncs once
        before anything of the turn leaves the process.

        The events' own ``seq`` (usually ``None``) is ignored: the store assigns the next ones.
        """
        if self.readonly:
            raise EventLogError(f"{self.path}: opened read-only, cannot append")
        count = len(events)
        if not count:
            return []
        try:
            seqs = self._append(self.db.conn, events, count)
        except (sqlite3.Error, TypeError, ValueError, OverflowError) as error:  # the disk is full, the store
            # was closed, data that JSON cannot hold (a NaN, an object orjson does not know), a time beyond
            # SQLite's 64-bit integers, ...
            raise EventLogError(f"{self.path}: cannot append: {error}") from error
        if self.durability == "full" and self.path != MEMORY:
            self._unsynced = True
            if sync:
                self.sync()
        return seqs

    def sync(self) -> None:
        """Make every append so far durable: fsync the write-ahead log, once, if an append deferred it."""
        if not self._unsynced:
            return
        if self._wal_fd is None:
            # SQLite resolves a symlinked log and keeps its WAL beside the real file.
            self._wal_fd = os.open(os.path.realpath(self.path) + "-wal", os.O_RDONLY)
        os.fsync(self._wal_fd)
        self._unsynced = False

    def _append(self, conn: sqlite3.Connection, events: Sequence[Event], count: int) -> list[int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # SQLite numbers the rows: an INTEGER PRIMARY KEY without a value gets max(seq) + 1, so the rows
            # of one write transaction get consecutive seqs, in the order inserted. ``first`` is read only
            # when a new session needs its first seq before the insert; otherwise it follows from lastrowid.
            first: int | None = None
            class_codes = self._class_codes
            classes = set(map(type, events))
            if not classes <= _NEEDS_USERNAME.keys():  # an object that is not one of the event types
                raise EventLogError(f"{self.path}: cannot append {_unreadable(events)}")
            for cls in classes - class_codes.keys():
                class_codes[cls] = self._code(cls.type)
            # Column by column, most in loops that run in C: a fifth less CPU than one Python loop building the
            # rows event by event (0.68 against 0.86 us per event, SQLite aside, at batch 1024).
            ats = [event.at for event in events]
            if classes <= _WITH_USERNAME:
                usernames = [event.username for event in events]  # type: ignore[attr-defined]
            else:
                usernames = [getattr(event, "username", None) for event in events]
            username_types = set(map(type, usernames))
            # What could not be read back is refused: a time that is not an integer, a missing username (the
            # dataclasses check nothing, to stay cheap where the server makes them).
            if set(map(type, ats)) != _INT or not username_types <= _STR_OR_NONE or (
                _NONE in username_types
                and any(name is None and _NEEDS_USERNAME[type(event)] for event, name in zip(events, usernames))
            ):
                raise EventLogError(f"{self.path}: cannot append {_unreadable(events)}")
            lobbies, sessions = {event.lobby for event in events}, {event.session for event in events}
            if len(lobbies) == 1 and len(sessions) == 1:  # the usual batch: one session's
                key = (*lobbies, *sessions)
                sid = self._sids.get(key)
                if sid is None:
                    first = self._next_seq()
                    sid = self._sid(key, first)
                sid_column = None
                touched = {sid: count - 1}
            else:
                sid_column, touched, first = self._sid_column(events)
                sid = sid_column[-1]
            one_type, one_session = len(classes) == 1, sid_column is None
            rows = [ats, usernames, encode_data_column(events, classes)]
            once: list[int] = []
            if one_type:
                (cls,) = classes
                once.append(class_codes[cls])
            else:
                rows.append(list(map(class_codes.__getitem__, map(type, events))))
            if one_session:
                once.append(sid)
            else:
                rows.append(sid_column)
            width = len(rows)
            params: list[object] = [None] * (width * count)
            for index, column in enumerate(rows):
                params[index::width] = column
            done, last = 0, 0
            while done < count:
                chunk = min(1 << ((count - done).bit_length() - 1), _MAX_CHUNK)
                chunk_params = params if chunk == count else params[width * done : width * (done + chunk)]
                chunk_params += once
                last = conn.execute(_insert_sql(chunk, one_type, one_session), chunk_params).lastrowid
                done += chunk
            if first is None:
                first = last - count + 1
            elif last != first + count - 1:  # pragma: no cover - SQLite numbers rows as documented
                raise EventLogError(f"{self.path}: seqs {first}..{last} assigned to {count} events")
            if len(touched) == 1:
                conn.execute(_UPDATE_LAST, (first + count - 1, sid))
            else:
                conn.executemany(_UPDATE_LAST, [(first + i, s) for s, i in touched.items()])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            # A new session or type row may have been rolled back with the batch: forget them (both are
            # read again on a miss).
            self._sids.clear()
            self._sessions_by_sid.clear()
            self._codes.clear()
            self._names.clear()
            self._class_codes.clear()
            raise
        return list(range(first, first + count))

    def _sid_column(self, events: Sequence[Event]) -> tuple[list[int], dict[int, int], int | None]:
        """The session id of each of ``events`` (of several sessions), the index in the batch of each
        session's last event, and the batch's first seq if a new session needed it (else ``None``)."""
        column: list[int] = []
        touched: dict[int, int] = {}
        first: int | None = None
        sids = self._sids
        for index, event in enumerate(events):
            key = (event.lobby, event.session)
            sid = sids.get(key)
            if sid is None:
                if first is None:
                    first = self._next_seq()
                sid = self._sid(key, first + index)
            column.append(sid)
            touched[sid] = index
        return column, touched, first

    def _next_seq(self) -> int:
        return (self.db.conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0) + 1

    def _sid(self, key: tuple[str, str], first_seq: int) -> int:
        """The id of session ``key``, created (inside the caller's transaction) if new."""
        row = self.db.conn.execute("SELECT sid FROM sessions WHERE lobby = ? AND session = ?", key).fetchone()
        if row is None:
            cursor = self.db.conn.execute(
                "INSERT INTO sessions (lobby, session, first_seq, last_seq) VALUES (?, ?, ?, ?)",
                (*key, first_seq, first_seq),
            )
            sid = cursor.lastrowid
            assert sid is not None
        else:
            sid = row[0]
        self._sids[key] = sid
        self._sessions_by_sid[sid] = key
        return sid

    def _load_types(self) -> None:
        """Read the type codes of this log (a newer writer may have added some)."""
        names = dict(self.db.conn.execute("SELECT code, name FROM types"))
        self._names.clear()
        self._names.update(names)
        self._codes.clear()
        self._codes.update((name, code) for code, name in names.items())

    def _code(self, name: str) -> int:
        """The code of type ``name``, added (inside the caller's transaction) if new."""
        self._load_types()
        code = self._codes.get(name)
        if code is None:
            code = self.db.conn.execute("INSERT INTO types (name) VALUES (?)", [name]).lastrowid
            assert code is not None
            self._codes[name], self._names[code] = code, name
        return code

    def _type_name(self, code: int) -> str:
        name = self._names.get(code)
        if name is None:
            self._load_types()
            name = self._names.get(code)
            if name is None:
                raise ValueError(f"unknown event type code {code}")
        return name

    # -- reading ----------------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the last event, 0 for an empty log."""
        return self.db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0

    def last_at(self, lobby: str) -> int | None:
        """``at`` of the last event of ``lobby``, ``None`` when it has none."""
        row = self.db.execute(
            "SELECT at FROM events WHERE seq = (SELECT max(last_seq) FROM sessions WHERE lobby = ?)", [lobby]
        ).fetchone()
        return row[0] if row is not None else None

    def read(
        self,
        from_seq: int = 1,
        to_seq: int | None = None,
        *,
        lobby: str | None = None,
        session: str | None = None,
        username: str | None = None,
        types: Iterable[str] | None = None,
        _unknown_types_too: bool = False,
    ) -> Iterator[Event]:
        """The events with ``from_seq <= seq <= to_seq`` matching every filter given, in seq order, lazily."""
        where = ["seq >= ?"]
        params: list[object] = [from_seq]
        if to_seq is not None:
            where.append("seq <= ?")
            params.append(to_seq)
        if session is not None:
            # A session is a seq range: walk it on the primary key.
            found = self.db.execute(
                "SELECT sid, first_seq, last_seq FROM sessions WHERE session = ?"
                + (" AND lobby = ?" if lobby is not None else ""),
                [session] + ([lobby] if lobby is not None else []),
            ).fetchall()
            if not found:
                return (event for event in ())  # a generator like every read: it has close()
            where.append(f"sid IN ({', '.join('?' * len(found))})")
            params.extend(sid for sid, _, _ in found)
            where.append("seq BETWEEN ? AND ?")
            params.extend([min(first for _, first, _ in found), max(last for _, _, last in found)])
        elif lobby is not None:
            where.append("sid IN (SELECT sid FROM sessions WHERE lobby = ?)")
            params.append(lobby)
        if username is not None:
            where.append("username = ?")
            params.append(username)
        if types is not None:
            if isinstance(types, str):
                raise TypeError(f"types is a list of type names, not one string ({types!r}: use [{types!r}])")
            self._load_types()
            types = set(types)
            unknown = sorted(map(str, types - EVENT_TYPES.keys() - self._codes.keys()))
            if unknown:
                raise ValueError(f"unknown event type {', '.join(unknown)} (types: {', '.join(EVENT_TYPES)})")
            wanted = sorted({self._codes[name] for name in types if name in self._codes})
            if _unknown_types_too:  # rows that will not read, as in a read of every type
                known = [code for name, code in self._codes.items() if name in EVENT_TYPES]
                where.append(f"(type IN ({', '.join('?' * len(wanted))}) OR typeof(type) != 'integer' "
                             f"OR type NOT IN ({', '.join('?' * len(known))}))")
                params.extend([*wanted, *known])
            else:
                where.append(f"type IN ({', '.join('?' * len(wanted))})")
                params.extend(wanted)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq"
        return self._iterate(sql, params)

    def _session_of(self, sid: int) -> tuple[str, str]:
        key = self._sessions_by_sid.get(sid)
        if key is None:
            for row_sid, lobby, session in self.db.execute("SELECT sid, lobby, session FROM sessions"):
                self._sessions_by_sid[row_sid] = (lobby, session)
            key = self._sessions_by_sid[sid]
        return key

    def _iterate(self, sql: str, params: list[object]) -> Iterator[Event]:
        cursor = self.db.conn.execute(sql, params)
        session_of, names, type_name = self._session_of, self._names, self._type_name
        try:
            while rows := cursor.fetchmany(4096):
                for seq, sid, at, code, username, data in rows:
                    try:
                        type_ = names.get(code) or type_name(code)
                        event = event_from_fields(seq, *session_of(sid), at, type_, username, data)
                    except (ValueError, TypeError, KeyError) as error:
                        if isinstance(code, str):
                            raise EventLogError(
                                f"{self.path}: seq {seq}: its type is a name ({code!r}), as only the first builds "
                                f"of krmx-lobby wrote, which needs converting: {_how_to_convert(self.path)}"
                            ) from None
                        raise EventLogError(
                            f"{self.path}: seq {seq}: cannot read this event ({_unprefixed(error, seq)}): "
                            "a damaged row, or one written by a newer krmx-lobby"
                        ) from None
                    yield event
        finally:
            cursor.close()

    # -- snapshots --------------------------------------------------------------------------------------

    def save_snapshot(self, registry: Registry) -> None:
        """Store ``registry`` (a fold of this log up to ``registry.seq``) so :meth:`load_registry` can resume."""
        if self.readonly:
            raise EventLogError(f"{self.path}: opened read-only, cannot save a snapshot")
        if registry.lobby is None or registry.seq is None:
            raise ValueError("cannot snapshot an empty registry")
        if registry.seq > self.last_seq:
            raise ValueError(f"registry at seq {registry.seq} is ahead of the log (last seq {self.last_seq})")
        users = orjson.dumps(list(registry.users.items()))
        with self.db.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO snapshots (lobby, seq, session, closed, users) VALUES (?, ?, ?, ?, ?)",
                [registry.lobby, registry.seq, registry.session, int(registry.closed), users],
            )

    def read_snapshot(self, lobby: str, seq: int) -> Registry | None:
        """The registry snapshot of ``lobby`` at ``seq`` as it was saved, ``None`` if there is none; raises
        :class:`EventLogError` if it does not read."""
        row = self.db.execute(
            "SELECT session, closed, users FROM snapshots WHERE lobby = ? AND seq = ?", [lobby, seq]
        ).fetchone()
        if row is None:
            return None
        session, closed, users = row
        try:
            if not isinstance(session, str):
                raise ValueError("no session")
            return Registry.saved(lobby, seq, session, closed, users)
        except (ValueError, TypeError) as error:
            raise EventLogError(f"{self.path}: the registry snapshot of {lobby!r} at seq {seq} does not read: {error}") from None

    def load_registry(self, lobby: str, to_seq: int | None = None) -> Registry:
        """The registry of ``lobby`` after ``to_seq`` (default: the whole log): the latest snapshot at or
        before that point, then a fold of the events after it. Equal to a full fold of the log.

        Only the events that change a registry (:data:`LIFECYCLE_TYPES`) are read and folded: custom
        messages and cut-offs change nothing (``lobby replay verify`` checks them, with a full fold), and
        they are most of a busy log."""
        registry = Registry()
        bound = to_seq if to_seq is not None else self.last_seq  # fixed first: a writer may append meanwhile
        from_seq = 1
        #: The snapshots this call passed over because they do not read (derived data: an earlier one, or the
        #: log from its start, gives the same registry), as ``(seq, reason)``.
        self.unreadable_snapshots: list[tuple[int, str]] = []
        if "snapshots" in self.db.table_names():
            for (seq,) in self.db.execute(
                "SELECT seq FROM snapshots WHERE lobby = ? AND seq <= ? ORDER BY seq DESC", [lobby, bound]
            ).fetchall():
                try:
                    snapshot = self.read_snapshot(lobby, seq)
                except EventLogError as error:
                    self.unreadable_snapshots.append((seq, str(error)))
                    continue
                if snapshot is not None:
                    registry, from_seq = snapshot, seq + 1
                    break
        # The lifecycle types alone, and any row of a type this version does not know: passed over, it would
        # leave a registry without its user (and a server appending after it); read, it stops the fold.
        events = self.read(from_seq, bound, lobby=lobby, types=LIFECYCLE_TYPES, _unknown_types_too=True)
        try:
            rebuild(events, registry)
        finally:
            events.close()  # type: ignore[attr-defined]  # its cursor, before anyone closes the database
        if registry.lobby is not None:
            # The fold's position is the lobby's last event up to the bound, whatever its type.
            last = self.db.execute(
                "SELECT seq FROM events WHERE seq BETWEEN ? AND ? "
                "AND sid IN (SELECT sid FROM sessions WHERE lobby = ?) ORDER BY seq DESC LIMIT 1",
                [from_seq, bound, lobby],
            ).fetchone()
            if last is not None:
                registry.seq = last[0]
        return registry

    def lobbies(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT DISTINCT lobby FROM sessions ORDER BY lobby")]

    def sessions(self, lobby: str | None = None) -> list[SessionInfo]:
        """Every session in the log (of ``lobby``, if given), in the order they started."""
        where, params = ("WHERE s.lobby = ?", [lobby]) if lobby is not None else ("", [])
        counts: dict[int, dict[str, int]] = {}
        for sid, code, count in self.db.execute(
            f"SELECT e.sid, e.type, count(*) FROM events e JOIN sessions s USING (sid) {where} "
            "GROUP BY e.sid, e.type",
            params,
        ):
            counts.setdefault(sid, {})[self._type_name(code)] = count
        result = []
        for sid, lobby_, session, first, last, start, last_at, end, users in self.db.execute(
            f"""SELECT s.sid, s.lobby, s.session, s.first_seq, s.last_seq,
                       (SELECT at FROM events WHERE seq = s.first_seq),
                       (SELECT at FROM events WHERE seq = s.last_seq),
                       (SELECT max(at) FROM events WHERE seq BETWEEN s.first_seq AND s.last_seq
                                                     AND sid = s.sid
                                                     AND type = (SELECT code FROM types WHERE name = 'close')),
                       (SELECT count(DISTINCT username) FROM events WHERE seq BETWEEN s.first_seq AND s.last_seq
                                                                      AND sid = s.sid)
                FROM sessions s {where} ORDER BY s.first_seq""",
            params,
        ):
            result.append(
                SessionInfo(
                    lobby=lobby_,
                    session=session,
                    first_seq=first,
                    last_seq=last,
                    start=start,
                    last_at=last_at,
                    end=end,
                    users=users,
                    counts=counts.get(sid, {}),
                )
            )
        return result
