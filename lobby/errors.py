"""Errors of the server and the client, under the one root ``LobbyError`` (see ``events.errors``)."""

from __future__ import annotations

from events.errors import LobbyError

__all__ = ["LobbyError", "ServerError", "ClientError", "LinkRejected"]


class ServerError(LobbyError):
    """A server call that cannot be done now: unknown or unlinked user, existing user, invalid username,
    a ``krmx/`` type from the application, a call in the wrong status."""


class ClientError(LobbyError):
    """A client call that cannot be done in the client's current status, or a connection that failed."""


class LinkRejected(ClientError):
    """The server rejected a link request; ``reason`` is the server's own words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"link rejected: {reason}")
