"""The one clock: UTC microseconds since the epoch. Tests freeze it with freezegun."""

from __future__ import annotations

import time

__all__ = ["now_us"]


def now_us() -> int:
    return time.time_ns() // 1000
