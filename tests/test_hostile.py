"""Hostile input at volume (bench/hostile.py, with a small count): the server stays up, honest clients see
no error and keep their p99 round trip within the documented bound, and the log verifies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "hostile.py"


def load_script():
    spec = importlib.util.spec_from_file_location("hostile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hostile_frames_at_volume_while_honest_clients_play():
    hostile = load_script()
    report = hostile.run(frames=3_000, attackers=3, honest=3, baseline_s=2.0)
    assert report["frames_sent"] >= 3_000
    assert report["honest_errors"] == []
    assert report["health_status"] == "listening" and report["server_exit_code"] == 0
    assert report["verify_exit_code"] == 0, report["verify_output"]
    assert report["attack_p99_ms"] <= report["baseline_p99_ms"] + hostile.DEFAULT_BOUND_MS, report
    assert report["ok"]
