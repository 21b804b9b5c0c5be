"""Event model, SQLite event store and the registry projection of krmx-lobby. No websockets here."""

from .clock import now_us
from .errors import EventLogError, InconsistentEvent, LobbyError
from .model import (
    EVENT_TYPES,
    LIFECYCLE_TYPES,
    Broadcast,
    Close,
    Cutoff,
    Event,
    Join,
    Leave,
    Link,
    Listen,
    Message,
    Send,
    Unlink,
)
from .projection import Registry, apply, rebuild, recovery_events
from .store import APPLICATION_ID, SCHEMA_VERSION, EventStore, SessionInfo

__all__ = [
    "APPLICATION_ID",
    "EVENT_TYPES",
    "LIFECYCLE_TYPES",
    "SCHEMA_VERSION",
    "Broadcast",
    "Close",
    "Cutoff",
    "Event",
    "EventLogError",
    "EventStore",
    "InconsistentEvent",
    "Join",
    "Leave",
    "Link",
    "Listen",
    "LobbyError",
    "Message",
    "Registry",
    "Send",
    "SessionInfo",
    "Unlink",
    "apply",
    "now_us",
    "rebuild",
    "recovery_events",
]
