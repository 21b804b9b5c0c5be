"""The options of a server: one frozen object, built once from code, CLI flags or ``LOBBY_*`` variables."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from .protocol import DEFAULT_VERSIONS, is_valid_username

__all__ = ["ServerConfig", "QueryRule", "DEFAULT_MAX_FRAME_SIZE", "parse_size"]

#: Frames up to 4 MiB must be handled (the Krmx conformance suite sends them); larger ones close the connection.
DEFAULT_MAX_FRAME_SIZE = 4 * 1024 * 1024

#: A required query parameter: ``True`` present, ``False`` absent, a string equal, a callable a predicate.
QueryRule = bool | str | Callable[[str | None], bool]


@dataclass(frozen=True)
class ServerConfig:
    """Every option of a server. Built once (from code, CLI flags or ``LOBBY_*`` variables), never read deep."""

    #: A name or address, a list of them, or ``None`` for every interface.
    host: str | list[str] | None = "127.0.0.1"
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
    #: Users at most: a link that would create one more is rejected ("lobby is full"). Every user stays until it
    #: leaves, and every link is sent them all: without a bound, one client linking new names grows both.
    max_users: int = 10_000
    #: Messages per second one connection may send on average, and in one burst (a token bucket).
    message_rate: float = 1000.0
    message_burst: int = 1000
    #: Bytes waiting to be written to one connection at most: a client that stops reading is cut off.
    max_buffer: int = 16 * 1024 * 1024
    #: Seconds a new connection has to link for the first time.
    link_deadline: float | None = 60.0
    #: Seconds a new socket has to finish its HTTP upgrade: one that sends its request slowly, or never (a
    #: slowloris), holds a socket until then.
    handshake_timeout: float = 10.0
    #: Web pages allowed to open a websocket, by their origin (``https://game.example.com``; a compiled regex
    #: matches a whole origin); ``None``: any. Browsers send the page's origin with every upgrade, so without
    #: this any site's page could link users from its visitors' browsers. A request without an Origin header
    #: (a game client, a bot: not a browser) is let in.
    origins: tuple[str | re.Pattern[str], ...] | None = None
    #: Reverse proxies whose ``X-Forwarded-For`` is believed (addresses or networks, ``"*"`` for any peer): log
    #: lines then show the client's address as ``remote`` and the proxy's as ``proxy``. Only list proxies
    #: you run: anyone else can write that header.
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Every option is checked here, whatever set it (code, flags, variables): a bad value fails at
        # configuration with its name, not later inside a connection.
        if isinstance(self.db, os.PathLike):
            object.__setattr__(self, "db", os.fspath(self.db))
        for name in ("db", "lobby", "path"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, not {getattr(self, name)!r}")
        hosts = [self.host] if isinstance(self.host, str) else self.host
        if hosts is not None and (not isinstance(hosts, (list, tuple)) or not all(isinstance(h, str) and h for h in hosts)):
            raise ValueError(f"host must be a name or address, a list of them, or None (every interface), not {self.host!r}")
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer 0..65535, not {self.port!r}")
        if not self.path.startswith("/"):
            object.__setattr__(self, "path", "/" + self.path)
        if "?" in self.path or "#" in self.path:
            raise ValueError(f"path must be a path, without a query or fragment (see query_params), not {self.path!r}")
        if self.path in ("/health", "/metrics"):
            raise ValueError(f"path {self.path} is taken by the health and metrics endpoints")
        if self.durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {self.durability!r}")
        for name in ("ping_interval", "link_deadline"):
            value = getattr(self, name)
            if value is not None and not _is_positive(value):
                raise ValueError(f"{name} must be a positive number of seconds (or None to disable), not {value!r}")
        for name in ("auth_timeout", "handshake_timeout", "message_rate"):
            if not _is_positive(getattr(self, name)):
                raise ValueError(f"{name} must be a positive number, not {getattr(self, name)!r}")
        for name in ("max_frame_size", "max_buffer"):  # sizes may be given as in a flag: "64KiB"
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    object.__setattr__(self, name, parse_size(value))
                except ValueError as error:
                    raise ValueError(f"{name} {error}, not {value!r}") from None
        for name, least in (("max_frame_size", 1024), ("snapshot_every", 1), ("max_connections", 1), ("max_users", 1),
                            ("message_burst", 1), ("max_buffer", 1024)):
            value = getattr(self, name)
            if not _is_int(value) or not least <= value <= _MAX_INT:
                raise ValueError(f"{name} must be an integer from {least} to 2**63-1, not {value!r}")
        for name in ("accept_new_users", "compression"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, not {getattr(self, name)!r}")
        if not callable(self.username_predicate):
            raise ValueError(f"username_predicate must be a function of the username, not {self.username_predicate!r}")
        if not isinstance(self.query_params, Mapping) or not all(
            isinstance(name, str) and name and (isinstance(rule, (bool, str)) or callable(rule))
            for name, rule in self.query_params.items()
        ):
            raise ValueError(
                "query_params must map parameter names to a rule (True: present, False: absent, a string: equal, "
                f"a function: a predicate), not {self.query_params!r}"
            )
        if self.max_buffer < self.max_frame_size:
            raise ValueError(
                f"max_buffer ({self.max_buffer} bytes) must be at least max_frame_size ({self.max_frame_size} bytes): "
                "a reply may be that large"
            )
        if isinstance(self.versions, str) or not self.versions or not all(
            isinstance(v, str) and _VERSION_LINE.fullmatch(v) for v in self.versions
        ):
            raise ValueError(
                f"versions must be a non-empty tuple of version lines, major.minor like ('0.5', '0.6'), not {self.versions!r}"
            )
        object.__setattr__(self, "versions", tuple(self.versions))
        if isinstance(self.trusted_proxies, str) or not isinstance(self.trusted_proxies, (list, tuple)):
            raise ValueError(f"trusted_proxies must be a list of addresses or networks, not {self.trusted_proxies!r}")
        for proxy in self.trusted_proxies:
            if proxy != "*":
                try:
                    ipaddress.ip_network(proxy, strict=False)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"trusted_proxies must be addresses or networks, like 10.0.0.0/8 or ::1, or '*', not {proxy!r}"
                    ) from None
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        if self.origins is not None:
            if isinstance(self.origins, (str, re.Pattern)) or not isinstance(self.origins, (list, tuple)) or not all(
                isinstance(o, re.Pattern) or (isinstance(o, str) and _ORIGIN.fullmatch(o)) for o in self.origins
            ):
                raise ValueError(
                    "origins must be a list of web origins, scheme://host[:port] without a path, like "
                    f"('https://game.example.com',), or None for any, not {self.origins!r}"
                )
            # Browsers send the scheme and host in lower case (RFC 6454 6.1).
            object.__setattr__(self, "origins", tuple(o if isinstance(o, re.Pattern) else o.lower() for o in self.origins))


#: A web origin as browsers send it: a scheme, a host and maybe a port; no path, no trailing slash.
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@]+")

#: A client version line: a client's version is accepted when it starts with one (KRMX.md, rule 4).
_VERSION_LINE = re.compile(r"[0-9]+\.[0-9]+")

_SIZE_UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3, "": 1}


def parse_size(text: str) -> int:
    """A size in bytes: ``65536``, ``64k``, ``4MiB``, ``1.5GiB``."""
    lowered = text.strip().lower()
    for suffix, factor in _SIZE_UNITS.items():  # longest suffixes first
        if lowered.endswith(suffix):
            try:
                value = float(lowered[: len(lowered) - len(suffix)]) * factor
            except ValueError:
                break
            if math.isfinite(value) and value >= 0:
                return int(value)
            break
    raise ValueError("must be a size in bytes, like 65536, 64KiB, 4MiB or 1GiB")


#: The largest integer option: 64 bits, as SQLite, the metrics and the JSON log lines hold them.
_MAX_INT = 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    """A finite number above zero (not a bool: ``True`` seconds is a mistake)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
