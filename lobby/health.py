"""``GET /health`` (JSON) and ``GET /metrics`` (Prometheus text format) on the websocket's port.

Hot-path counts are plain integers the server increments; they become Prometheus metrics only when
scraped (a collector reads them), so serving pays nothing for metrics nobody asks for. Each server has a
registry of its own, so several servers in one process (tests, many lobbies) do not collide.
"""

from __future__ import annotations

import time
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Metrics", "VERSION"]

try:
    VERSION = version("krmx-lobby")
except PackageNotFoundError:  # running from a checkout that is not installed
    VERSION = "unknown"

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.started = time.monotonic()
        self.frames_in = 0
        self.frames_out = 0
        self.events_appended = 0
        self.cutoffs: Counter[str] = Counter()
        #: Upgrade requests refused before any websocket (a wrong path, origin or query parameter), by reason.
        self.refused: Counter[str] = Counter()
        self.registry = CollectorRegistry(auto_describe=True)
        self.commit_seconds = Histogram(
            "krmx_commit_seconds",
            "Time to commit one turn's events to the event log: its transactions and their fsync",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.registry.register(_Collector(self))

    def health(self) -> dict[str, Any]:
        server = self.server
        core = server.core
        registry = core.registry if core is not None else None
        return {
            "status": server.status,
            "users": len(registry.users) if registry is not None else 0,
            "linked_users": len(registry.linked()) if registry is not None else 0,
            "connections": core.connection_count if core is not None else 0,
            "lobby": server.config.lobby,
            "session": server.session,
            "last_seq": registry.seq if registry is not None else None,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "version": VERSION,
        }

    def health_json(self) -> bytes:
        return orjson.dumps(self.health())

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        metrics = self.metrics
        health = metrics.health()
        core = metrics.server.core
        yield GaugeMetricFamily("krmx_connections", "Open websocket connections", value=health["connections"])
        yield GaugeMetricFamily("krmx_users", "Users in the lobby (joined)", value=health["users"])
        yield GaugeMetricFamily("krmx_linked_users", "Users linked to a connection", value=health["linked_users"])
        yield CounterMetricFamily("krmx_frames_in", "Frames received", value=metrics.frames_in)
        yield CounterMetricFamily("krmx_frames_out", "Frames sent", value=metrics.frames_out)
        yield CounterMetricFamily("krmx_events_appended", "Events appended to the log", value=metrics.events_appended)
        rejections = CounterMetricFamily("krmx_rejections", "Frames answered krmx/rejected (link requests, and frames of unlinked connections), by reason", labels=["reason"])
        for reason, count in sorted((core.rejections if core is not None else {}).items()):
            rejections.add_metric([reason], count)
        yield rejections
        cutoffs = CounterMetricFamily("krmx_cutoffs", "Connections cut off by a limit, by reason", labels=["reason"])
        for reason, count in sorted(metrics.cutoffs.items()):
            cutoffs.add_metric([reason], count)
        yield cutoffs
        refused = CounterMetricFamily("krmx_refused_upgrades", "Upgrade requests refused before the websocket, by reason",
                                      labels=["reason"])
        for reason, count in sorted(metrics.refused.items()):
            refused.add_metric([reason], count)
        yield refused
