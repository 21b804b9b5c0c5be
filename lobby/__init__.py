"""krmx-lobby: an event-sourced Krmx lobby server and client.

    from lobby import Server
"""

from .errors import ClientError, LinkRejected, LobbyError, ServerError
from .protocol import DEFAULT_VERSIONS, PROTOCOL_VERSION, ServerProtocol, is_valid_username
from .server import AuthInfo, Server, ServerConfig

__all__ = [
    "DEFAULT_VERSIONS",
    "PROTOCOL_VERSION",
    "AuthInfo",
    "ClientError",
    "LinkRejected",
    "LobbyError",
    "Server",
    "ServerConfig",
    "ServerError",
    "ServerProtocol",
    "is_valid_username",
]
