"""The options of a server: one frozen object, built once from code, CLI flags or ``LOBBY_*`` variables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .protocol import DEFAULT_VERSIONS, is_valid_username

__all__ = ["ServerConfig", "QueryRule", "DEFAULT_MAX_FRAME_SIZE"]

#: Frames up to 4 MiB must be handled (the Krmx conformance suite sends them); larger ones close the connection.
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024

#: A required query parameter: ``True`` present, ``False`` absent, a string equal, a callable a predicate.
QueryRule = bool | str | Callable[[str | None], bool]


@dataclass(frozen=True)
class ServerConfig:
    """Every option of a server. Built once (from code, CLI flags or ``LOBBY_*`` variables), never read deep."""

    host: str = "127.0.0.1"
    port: int = 8082
    #: The websocket path; other paths get HTTP 404.
    path: str = "/"
    db: str = "lobby.db"
    durability: Literal["full", "normal"] = "full"
    lobby: str = "main"
    accept_new_users: bool = True
    username_predicate: Callable[[str], bool] = is_valid_username
    query_params: dict[str, QueryRule] = field(default_factory=dict)
    #: Seconds between pings; a connection that has not answered the previous ping by then is terminated.
    ping_interval: float | None = 15.0
    auth_timeout: float = 10.0
    versions: tuple[str, ...] = DEFAULT_VERSIONS
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    #: permessage-deflate: off, like the reference server (it costs CPU on every frame of every fan-out).
    compression: bool = False
    #: Write a registry snapshot every this many events, so start-up folds only the tail of the log.
    snapshot_every: int = 10_000
    #: Open connections at most; more are refused with HTTP 503 before the upgrade.
    max_connections: int = 10_000
    #: Messages per second one connection may send on average, and in one burst (a token bucket).
    message_rate: float = 1000.0
    message_burst: int = 1000
    #: Bytes waiting to be written to one connection at most: a client that stops reading is cut off.
    max_buffer: int = 16 * 1024 * 1024
    #: Seconds a new connection has to link for the first time.
    link_deadline: float | None = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        if not self.path.startswith("/"):
            object.__setattr__(self, "path", "/" + self.path)
        if self.durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {self.durability!r}")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise ValueError("ping_interval must be positive (or None to disable pings)")
        if self.auth_timeout <= 0:
            raise ValueError("auth_timeout must be positive")
        if self.max_frame_size < 1024:
            raise ValueError("max_frame_size must be at least 1024 bytes")
        if not self.versions:
            raise ValueError("at least one client version line must be accepted")
        if self.snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if self.path in ("/health", "/metrics"):
            raise ValueError(f"path {self.path} is taken by the health and metrics endpoints")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if self.message_rate <= 0 or self.message_burst < 1:
            raise ValueError("message_rate must be positive and message_burst at least 1")
        if self.max_buffer < self.max_frame_size:
            raise ValueError("max_buffer must be at least max_frame_size (a reply may be that large)")
        if self.link_deadline is not None and self.link_deadline <= 0:
            raise ValueError("link_deadline must be positive (or None for no deadline)")
