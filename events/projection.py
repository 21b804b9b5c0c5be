"""The user registry as a projection of the event log.

``apply(registry, event)`` is the only way a registry changes: the server feeds it the events it records,
the replay tool feeds it the events it reads, so both see the same lobby. It does no I/O and depends only
on its inputs; an event that cannot follow the registry's state raises :class:`InconsistentEvent` naming
its seq and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .errors import InconsistentEvent
from .model import Event, Unlink

__all__ = ["Registry", "apply", "rebuild", "recovery_events"]


class Registry:
    """Users of one lobby in join order with their linked flag, the current session and its state.

    ``seq`` is the position of the last event applied, so a fold can resume from it.
    """

    __slots__ = ("lobby", "session", "closed", "seq", "users")

    def __init__(self) -> None:
        self.lobby: str | None = None
        self.session: str | None = None
        #: True once the current session logged ``close``; a log whose last session is not closed crashed.
        self.closed = False
        self.seq: int | None = None
        #: username -> linked, in join order (dicts keep insertion order).
        self.users: dict[str, bool] = {}

    @property
    def needs_recovery(self) -> bool:
        """The last session ended without ``close``: see :func:`recovery_events`."""
        return self.session is not None and not self.closed

    def linked(self) -> list[str]:
        return [username for username, linked in self.users.items() if linked]

    def as_list(self) -> list[dict[str, Any]]:
        """The Krmx view: ``[{"username": ..., "isLinked": ...}]`` in join order."""
        return [{"username": name, "isLinked": linked} for name, linked in self.users.items()]

    @classmethod
    def saved(cls, lobby: str, seq: int, session: str | None, closed: object, users: bytes | str) -> Registry:
        """A registry as saved (a snapshot, a checkpoint): ``users`` the JSON of its ``[username, linked]``
        pairs. Raises ``ValueError`` for one that does not read."""
        pairs = orjson.loads(users)  # orjson.JSONDecodeError is a ValueError
        if type(pairs) is not list or not all(
            type(pair) is list and len(pair) == 2 and type(pair[0]) is str and type(pair[1]) is bool for pair in pairs
        ):
            raise ValueError("not a list of [username, linked] pairs")
        registry = cls()
        registry.lobby, registry.seq, registry.session, registry.closed = lobby, seq, session, bool(closed)
        registry.users = dict(pairs)
        return registry

    def copy(self) -> Registry:
        other = Registry()
        other.lobby, other.session, other.closed, other.seq = self.lobby, self.session, self.closed, self.seq
        other.users = dict(self.users)
        return other

    def _state(self) -> tuple[Any, ...]:
        # Join order matters: compare the items as a list, not as a dict.
        return (self.lobby, self.session, self.closed, self.seq, list(self.users.items()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Registry):
            return NotImplemented
        return self._state() == other._state()

    def __repr__(self) -> str:
        return (
            f"Registry(lobby={self.lobby!r}, session={self.session!r}, closed={self.closed}, "
            f"seq={self.seq}, users={self.users!r})"
        )


def _check_session(registry: Registry, event: Event) -> None:
    if registry.session is None:
        raise InconsistentEvent(event.seq, f"{event.type} before any listen")
    if event.session != registry.session:
        raise InconsistentEvent(
            event.seq, f"{event.type} of session {event.session!r} while session {registry.session!r} is current"
        )
    if registry.closed:
        raise InconsistentEvent(event.seq, f"{event.type} after session {registry.session!r} closed")


def _linked_user(registry: Registry, event: Event, username: str) -> None:
    linked = registry.users.get(username)
    if linked is None:
        raise InconsistentEvent(event.seq, f"{event.type} of unknown user {username!r}")
    if not linked:
        raise InconsistentEvent(event.seq, f"{event.type} of user {username!r}, who is not linked")


def _listen(registry: Registry, event: Any) -> None:
    # A listen after a session that never closed is a restart after a crash: its users stay as they were
    # until the recovery unlinks that follow it.
    registry.session = event.session
    registry.closed = False


def _join(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    if event.username in registry.users:
        raise InconsistentEvent(event.seq, f"join of existing user {event.username!r}")
    registry.users[event.username] = False


def _link(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    linked = registry.users.get(event.username)
    if linked is None:
        raise InconsistentEvent(event.seq, f"link of unknown user {event.username!r}")
    if linked:
        raise InconsistentEvent(event.seq, f"link of user {event.username!r}, who is already linked")
    registry.users[event.username] = True


def _unlink(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    _linked_user(registry, event, event.username)
    registry.users[event.username] = False


def _leave(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    linked = registry.users.get(event.username)
    if linked is None:
        raise InconsistentEvent(event.seq, f"leave of unknown user {event.username!r}")
    if linked:
        raise InconsistentEvent(event.seq, f"leave of user {event.username!r} while linked (unlink comes first)")
    del registry.users[event.username]


def _to_linked_user(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    _linked_user(registry, event, event.username)


def _broadcast(registry: Registry, event: Any) -> None:
    _check_session(registry, event)


def _cutoff(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    if event.username is not None:
        _linked_user(registry, event, event.username)


def _close(registry: Registry, event: Any) -> None:
    _check_session(registry, event)
    linked = registry.linked()
    if linked:
        raise InconsistentEvent(event.seq, f"close while users are linked: {', '.join(linked)}")
    registry.closed = True


_APPLY = {
    "listen": _listen,
    "join": _join,
    "link": _link,
    "message": _to_linked_user,
    "send": _to_linked_user,
    "broadcast": _broadcast,
    "unlink": _unlink,
    "leave": _leave,
    "close": _close,
    "cutoff": _cutoff,
}


def apply(registry: Registry, event: Event) -> None:
    """Fold one event into ``registry``; raise :class:`InconsistentEvent` (and change nothing) if it cannot follow."""
    if registry.lobby is not None and event.lobby != registry.lobby:
        raise InconsistentEvent(event.seq, f"event of lobby {event.lobby!r} applied to lobby {registry.lobby!r}")
    if registry.seq is not None and event.seq is not None and event.seq <= registry.seq:
        raise InconsistentEvent(event.seq, f"applied after seq {registry.seq}: out of order")
    _APPLY[event.type](registry, event)
    registry.lobby = event.lobby
    if event.seq is not None:
        registry.seq = event.seq


def rebuild(events: Iterable[Event], registry: Registry | None = None) -> Registry:
    """Fold ``events`` into a new registry (or on from ``registry``, which is changed in place)."""
    registry = Registry() if registry is None else registry
    for event in events:
        apply(registry, event)
    return registry


def recovery_events(registry: Registry, *, session: str, at: int) -> list[Unlink]:
    """The events that bring a log whose last session ended without ``close`` back to a consistent state.

    Every user still linked is unlinked with reason ``recovered``, in join order, in the new ``session``
    (append them right after that session's ``listen``). Empty when nothing needs recovering.
    """
    if not registry.needs_recovery or registry.lobby is None:
        return []
    return [
        Unlink(lobby=registry.lobby, session=session, at=at, username=username, reason="recovered")
        for username in registry.linked()
    ]
