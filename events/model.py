"""The events of a lobby: frozen dataclasses, one per type, and their mapping to log rows.

Every event carries where it happened (``lobby``, ``session``), when (``at``: UTC microseconds since the
epoch) and, once stored, its place in the log (``seq``: gapless and increasing, ``None`` before the store
assigned it). The auth string a client sends is never part of an event: :class:`Link` only records
whether one was given.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar, Sequence

import orjson

__all__ = [
    "Event",
    "Listen",
    "Join",
    "Link",
    "Message",
    "Send",
    "Broadcast",
    "Unlink",
    "Leave",
    "Close",
    "Cutoff",
    "EVENT_TYPES",
    "LIFECYCLE_TYPES",
    "dumps",
    "encode_data_column",
    "event_from_row",
    "event_from_fields",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    type: ClassVar[str] = ""

    lobby: str
    session: str
    at: int
    seq: int | None = None

    @property
    def time(self) -> datetime:
        """``at`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.at / 1_000_000, tz=timezone.utc)

    def with_seq(self, seq: int) -> Event:
        return dataclasses.replace(self, seq=seq)

    def data(self) -> dict[str, Any]:
        """The type-specific fields, as stored in the ``data`` column (``username`` has its own column).

        Each type spells its own out: this runs once per appended event.
        """
        return {}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: the common fields, ``type`` and the type-specific fields."""
        return {
            "seq": self.seq,
            "lobby": self.lobby,
            "session": self.session,
            "at": self.at,
            "type": self.type,
            "username": getattr(self, "username", None),
            **self.data(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen(Event):
    """A session starts: the server listens. ``port`` is ``None`` when not known (a server on a socket)."""

    type: ClassVar[str] = "listen"
    port: int | None = None

    def data(self) -> dict[str, Any]:
        return {"port": self.port}


@dataclass(frozen=True, slots=True, kw_only=True)
class Join(Event):
    type: ClassVar[str] = "join"
    username: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Link(Event):
    """A connection linked to the user. ``auth`` says whether the link request carried an auth string."""

    type: ClassVar[str] = "link"
    username: str
    auth: bool = False

    def data(self) -> dict[str, Any]:
        return {"auth": self.auth}


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Event):
    """A custom message from a linked user to the server: the whole frame (``type`` and ``payload``)."""

    type: ClassVar[str] = "message"
    username: str
    message: Any

    def data(self) -> dict[str, Any]:
        return {"message": self.message}


@dataclass(frozen=True, slots=True, kw_only=True)
class Send(Event):
    """The application sent a custom message to one user."""

    type: ClassVar[str] = "send"
    username: str
    message: Any

    def data(self) -> dict[str, Any]:
        return {"message": self.message}


@dataclass(frozen=True, slots=True, kw_only=True)
class Broadcast(Event):
    """The application sent a custom message to every linked user but ``skip`` (one record per call)."""

    type: ClassVar[str] = "broadcast"
    message: Any
    skip: str | None = None

    def data(self) -> dict[str, Any]:
        return {"message": self.message, "skip": self.skip}


@dataclass(frozen=True, slots=True, kw_only=True)
class Unlink(Event):
    """The user's connection was detached; ``reason`` says why (``requested``, ``dropped``, ``kick``, ...)."""

    type: ClassVar[str] = "unlink"
    username: str
    reason: str

    def data(self) -> dict[str, Any]:
        return {"reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave(Event):
    type: ClassVar[str] = "leave"
    username: str
    reason: str

    def data(self) -> dict[str, Any]:
        return {"reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class Close(Event):
    """A session ends cleanly. ``reason`` is ``close`` (every user kicked) or ``server restart`` (users kept)."""

    type: ClassVar[str] = "close"
    reason: str = "close"

    def data(self) -> dict[str, Any]:
        return {"reason": self.reason}


@dataclass(frozen=True, slots=True, kw_only=True)
class Cutoff(Event):
    """The server cut a connection off by a limit (``slow consumer``, ``rate limit``, ``link deadline``,
    ``frame too large``, ``protocol error``, ``ping timeout``, ``too many connections``, ``handshake timeout``,
    ``flood during authentication``). ``connection`` names it within the session (``None`` when refused before it opened);
    ``username`` is its user if it was linked, whose ``unlink`` with the same reason follows."""

    type: ClassVar[str] = "cutoff"
    connection: str | None
    reason: str
    username: str | None = None

    def data(self) -> dict[str, Any]:
        return {"connection": self.connection, "reason": self.reason}


EVENT_TYPES: dict[str, type[Event]] = {
    cls.type: cls for cls in (Listen, Join, Link, Message, Send, Broadcast, Unlink, Leave, Close, Cutoff)
}
#: The types that change the registry or the session; custom messages do not.
LIFECYCLE_TYPES: frozenset[str] = frozenset({"listen", "join", "link", "unlink", "leave", "close"})

_COMMON_COLUMNS = frozenset({"lobby", "session", "at", "seq", "username"})

Row = tuple[int, int, int, str, str | None, str | bytes | None]


_dumps = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE


def dumps(obj: Any) -> bytes:
    """``orjson.dumps(obj)``, copied into an object of its own size.

    orjson returns its output buffer (4 KiB held for a 60-byte frame): thousands of those alive at once, in
    a batch waiting for its insert or in write queues, bloat memory and fragment the C heap (glibc then
    trims and regrows it on every batch: ~3 us/event instead of ~0.4 us). Slicing off the appended newline
    makes the right-sized copy at no extra cost."""
    return _dumps(obj, option=_NEWLINE)[:-1]


#: A null in a value's place, as orjson writes one (a NaN or an infinity among them), not "null" in a string.
_VALUE_NULL = re.compile(rb"[:\[,]null[,\]}]")


def holds_non_finite(value: Any, data: bytes) -> bool:
    """Whether ``value``, which orjson wrote as ``data``, holds a NaN or an infinity: orjson writes them as
    ``null``, silently. Nothing to do for ``data`` without a null in a value's place; a large value is then
    first read back from ``data`` and compared, in C (a NaN reads back as None, which differs); only when that
    differs, or for a small value, is it walked in Python (tuples, dataclasses and the like read back as
    something else too)."""
    if data.find(b"null") < 0 or not _VALUE_NULL.search(data):  # find: ``in`` on bytes costs 2x more
        return False
    if len(data) > 4096 and orjson.loads(data) == value:
        return False
    return _walk_non_finite(value)


def _walk_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_walk_non_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_walk_non_finite(item) for item in value)
    if dataclasses.is_dataclass(value):
        return any(_walk_non_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, enum.Enum):
        return _walk_non_finite(value.value)
    return False


#: Between two events' data in a batch's one JSON text: raw, so a control character that orjson writes
#: escaped wherever it could occur in data (in a string, as \u001e).
_SEPARATOR = orjson.Fragment(b"\x1e")


def encode_data_column(events: Sequence[Event], classes: set[type] | None = None) -> list[str | None]:
    """The ``data`` column of each of ``events``: its type-specific fields as JSON text, ``None`` when it has
    none. ``classes``, the set of the events' classes, saves a pass when the caller has it.

    Text, not bytes: sqlite3 binds a ``str`` directly but looks up an adapter for every ``bytes`` value
    (about 1 us per event on the append path), and SQL tools show text as it is. Logs written by earlier
    versions hold the same JSON as blobs; readers take both. Data nested more than 253 levels deep is refused
    (orjson's limit, less the level of the batch's list); the server refuses messages deeper than 128."""
    if not events:
        return []
    # A batch of one type with one data field (custom messages, the bulk of a log) writes the field's values,
    # each then wrapped as the object data() would be: a quarter less CPU than making those objects.
    if classes is None:
        classes = set(map(type, events))
    one_field = _ONE_DATA_FIELD.get(*classes) if len(classes) == 1 else None
    values = list(map(one_field[0], events)) if one_field else [event.data() for event in events]
    texts: list[str | None]
    if len(values) == 1:  # the usual stage of a lightly loaded server: nothing to cut apart
        batch = _dumps(values[0]).decode()
        texts = [batch]
    else:
        # One orjson call for the batch, then cut apart: 7% less CPU than one call per event, at batch 1024.
        items = [_SEPARATOR] * (2 * len(values) - 1)
        items[0::2] = values
        batch = _dumps(items).decode()
        # Only raw JSON (an orjson.Fragment in the data) could hold a raw separator, and shift the cuts.
        if batch.count("\x1e") != len(values) - 1:
            raise ValueError("data holds raw JSON (an orjson.Fragment) with a record separator")
        texts = batch[1:-1].split(",\x1e,")  # type: ignore[assignment]
    if one_field:
        prefix = one_field[1]
        texts = [f"{prefix}{text}}}" for text in texts]
    elif "{}" in texts:
        texts = [None if text == "{}" else text for text in texts]
    # A NaN or an infinity, which orjson writes as null, would read back as another event. One search over
    # the whole batch, then a closer look where there is one.
    if "null" in batch:
        for event, text in zip(events, texts):
            if text is not None and "null" in text and holds_non_finite(event.data(), text.encode()):
                raise ValueError(f"{event.type} data holds NaN or an infinity, which JSON cannot hold")
    return texts


def event_from_row(row: Row, lobby: str, session: str) -> Event:
    """The event a stored row ``(seq, sid, at, type, username, data)`` of ``lobby``/``session`` holds.

    Unknown keys in ``data`` (written by a newer minor version) are dropped.
    """
    seq, _sid, at, type_, username, data = row
    return event_from_fields(seq, lobby, session, at, type_, username, data)


def event_from_fields(
    seq: int, lobby: str, session: str, at: int, type_: str, username: str | None, data: str | bytes | None
) -> Event:
    """The event of a stored row, its type given by name (see :func:`event_from_row`)."""
    try:
        cls = EVENT_TYPES[type_]
    except KeyError:
        raise ValueError(f"seq {seq}: unknown event type {type_!r}") from None
    if type(at) is not int:
        raise ValueError(f"its time is not an integer: {at!r:.60}")
    fields = orjson.loads(data) if data else {}
    if type(fields) is not dict:
        raise ValueError(f"data is not a JSON object: {str(data)[:60]!r}")
    if username is not None:
        if type(username) is not str:
            raise ValueError(f"its username is not a string: {username!r:.60}")
        fields["username"] = username
    allowed = _FIELD_NAMES[cls]
    if not fields.keys() <= allowed:
        fields = {key: value for key, value in fields.items() if key in allowed}
    for name, types in _CHECKED_FIELDS[cls]:
        if name in fields and type(fields[name]) not in types:
            raise ValueError(f"its {name} is not {' or '.join(t.__name__ for t in types)}: {fields[name]!r:.60}")
    return cls(seq=seq, lobby=lobby, session=session, at=at, **fields)


_FIELD_NAMES = {cls: frozenset(f.name for f in dataclasses.fields(cls)) for cls in EVENT_TYPES.values()}
_DATA_FIELDS = {
    cls: frozenset(f.name for f in dataclasses.fields(cls) if f.name not in _COMMON_COLUMNS)
    for cls in EVENT_TYPES.values()
}
#: The types each typed data field may hold when read back (a damaged row fails where it is read, not later).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "port": (int, type(None)),
    "auth": (bool,),
    "reason": (str,),
    "skip": (str, type(None)),
    "connection": (str, type(None)),
}
_CHECKED_FIELDS = {
    cls: [(name, _FIELD_TYPES[name]) for name in names if name in _FIELD_TYPES] for cls, names in _DATA_FIELDS.items()
}
# Each type's data() must name exactly its own fields.
for _cls, _names in _DATA_FIELDS.items():
    _probe = {f.name: None for f in dataclasses.fields(_cls)}
    assert set(_cls(**_probe).data()) == _names, _cls
#: The types whose data is one field: how to read it, and how its JSON object starts (see encode_data_column).
_ONE_DATA_FIELD = {
    cls: (operator.attrgetter(name), f'{{"{name}":') for cls, names in _DATA_FIELDS.items() if len(names) == 1
    for name in names
}
