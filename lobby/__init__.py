"""krmx-lobby: an event-sourced Krmx lobby server and client.

    from lobby import Server, Client
"""

from .client import Client, EventStream
from .client_protocol import CLIENT_EVENTS, ClientEvent, ClientProtocol, RelinkPolicy
from .errors import ClientError, LinkRejected, LobbyError, ServerError
from .logs import configure_logging
from .protocol import DEFAULT_VERSIONS, PROTOCOL_VERSION, ServerProtocol, is_valid_username
from .server import AuthInfo, Server, ServerConfig

__all__ = [
    "CLIENT_EVENTS",
    "DEFAULT_VERSIONS",
    "PROTOCOL_VERSION",
    "AuthInfo",
    "Client",
    "ClientError",
    "ClientEvent",
    "ClientProtocol",
    "EventStream",
    "LinkRejected",
    "LobbyError",
    "RelinkPolicy",
    "Server",
    "ServerConfig",
    "ServerError",
    "ServerProtocol",
    "configure_logging",
    "is_valid_username",
]
