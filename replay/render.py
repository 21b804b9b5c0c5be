"""How events and registries read, for people (table rows) and for machines (JSON lines)."""

from __future__ import annotations

from typing import Any

import orjson

from events import Event, Registry

from .reader import format_time, iso_time

__all__ = ["event_detail", "event_json", "event_row", "table_header", "registry_line", "reason_label", "dumps"]

#: How the log's reasons read in timelines and swimlanes.
REASON_LABELS = {"close": "server close", "server": "server unlink"}


def reason_label(reason: str | None) -> str:
    return REASON_LABELS.get(reason or "", reason or "")


def dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _short(value: Any, width: int = 80) -> str:
    text = dumps(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def event_detail(event: Event) -> str:
    """What an event says beyond its type and user: a reason, a message, a port."""
    kind = event.type
    if kind == "listen":
        port = getattr(event, "port", None)
        return f"port {port}" if port is not None else ""
    if kind == "link":
        return "with auth" if getattr(event, "auth", False) else ""
    if kind in ("message", "send", "broadcast"):
        message = getattr(event, "message", None)
        if isinstance(message, dict) and isinstance(message.get("type"), str):
            text = message["type"]
            if "payload" in message:
                text += " " + _short(message["payload"], 70)
        else:
            text = _short(message)
        skip = getattr(event, "skip", None)
        return text + (f" (skip {skip})" if skip else "")
    reason = getattr(event, "reason", None)
    return reason_label(reason) if reason else ""


def event_json(event: Event) -> dict[str, Any]:
    """``event.to_dict()`` with a readable ``time``: one JSON line per event for jq and lnav."""
    data = event.to_dict()
    data["time"] = iso_time(event.at)
    return data


def table_header(*, seq_width: int = 6, with_session: bool = False) -> str:
    session = f"{'session':<12}  " if with_session else ""
    return f"{'seq':>{seq_width}}  {'time (UTC)':<23}  {session}{'type':<9}  {'user':<12}  detail"


def event_row(event: Event, *, seq_width: int = 6, with_session: bool = False) -> str:
    session = f"{event.session:<12}  " if with_session else ""
    username = getattr(event, "username", None) or ""
    return (
        f"{event.seq:>{seq_width}}  {format_time(event.at)}  {session}{event.type:<9}  {username:<12}  "
        f"{event_detail(event)}"
    ).rstrip()


def registry_line(registry: Registry) -> str:
    """``● alice  ○ bob`` (● linked, ○ joined but unlinked), or ``(no users)``."""
    if not registry.users:
        return "(no users)"
    return "  ".join(("● " if linked else "○ ") + name for name, linked in registry.users.items())
