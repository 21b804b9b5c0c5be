"""krmx-lobby: an event-sourced Krmx lobby server and client.

    from lobby import Server, Client

The names are imported when first used, so that the ``lobby`` command starts light (see :mod:`lobby.__main__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client, EventStream
    from .client_protocol import CLIENT_EVENTS, ClientEvent, ClientProtocol, RelinkPolicy
    from .errors import ClientError, LinkRejected, LobbyError, ServerError
    from .logs import configure_logging
    from .protocol import DEFAULT_VERSIONS, PROTOCOL_VERSION, ServerProtocol, is_valid_username
    from .server import AuthInfo, Server, ServerConfig

#: Each public name and the module that defines it.
_HOMES = {
    "Client": "client",
    "EventStream": "client",
    "CLIENT_EVENTS": "client_protocol",
    "ClientEvent": "client_protocol",
    "ClientProtocol": "client_protocol",
    "RelinkPolicy": "client_protocol",
    "ClientError": "errors",
    "LinkRejected": "errors",
    "LobbyError": "errors",
    "ServerError": "errors",
    "configure_logging": "logs",
    "DEFAULT_VERSIONS": "protocol",
    "PROTOCOL_VERSION": "protocol",
    "ServerProtocol": "protocol",
    "is_valid_username": "protocol",
    "AuthInfo": "server",
    "Server": "server",
    "ServerConfig": "server",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lobby' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
