"""krmx-lobby: an event-sourced Krmx lobby server and client.

    from lobby import Server, Client

The names are imported when first used, so that the ``lobby`` command starts light (see :mod:`lobby.__main__`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # each name as itself: re-exported for type checkers (mypy --strict)
    from .client import Client as Client
    from .client import EventStream as EventStream
    from .client_protocol import CLIENT_EVENTS as CLIENT_EVENTS
    from .client_protocol import ClientEvent as ClientEvent
    from .client_protocol import ClientProtocol as ClientProtocol
    from .client_protocol import RelinkPolicy as RelinkPolicy
    from .errors import ClientError as ClientError
    from .errors import LinkRejected as LinkRejected
    from .errors import LobbyError as LobbyError
    from .errors import ServerError as ServerError
    from .logs import configure_logging as configure_logging
    from .protocol import DEFAULT_VERSIONS as DEFAULT_VERSIONS
    from .protocol import PROTOCOL_VERSION as PROTOCOL_VERSION
    from .protocol import ServerProtocol as ServerProtocol
    from .protocol import is_valid_username as is_valid_username
    from .server import AuthInfo as AuthInfo
    from .server import Server as Server
    from .server import ServerConfig as ServerConfig

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

__all__ = [  # a literal list, as type checkers read it: the names of _HOMES (a test keeps them equal)
    "AuthInfo", "CLIENT_EVENTS", "Client", "ClientError", "ClientEvent", "ClientProtocol", "DEFAULT_VERSIONS",
    "EventStream", "LinkRejected", "LobbyError", "PROTOCOL_VERSION", "RelinkPolicy", "Server", "ServerConfig",
    "ServerError", "ServerProtocol", "configure_logging", "is_valid_username",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lobby' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
