"""Replay benchmark, run by hand (not a test):

    python bench/bench_replay.py [--events 1000000] [--points 12] [--dir /var/tmp]

Builds a 1,000,000-event log like a busy server writes it (``bench_store.build_big_log``: 200 users, mostly
custom messages, a registry snapshot every 10,000 events) and measures ``replay.state`` at several points,
each a whole call (open the file read-only, resolve the point, load the registry, close), against the
0.2 s budget; every answer is checked against a full fold of the log up to that point. Then the same on a
copy without snapshots (an old log): the first query folds the log once and leaves the sidecar index
(``<log>.replay-index``), the later ones use it. Also ``--at-time`` (a binary search on the primary key).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import replay  # noqa: E402
from bench_store import LOBBY, build_big_log  # noqa: E402
from events import EventStore, Registry, apply  # noqa: E402
from replay.reader import iso_time, open_log  # noqa: E402
from replay.state import StatePoint  # noqa: E402

BUDGET = 0.2


def full_folds(path: Path, points: list[int]) -> dict[int, Registry]:
    """The registry at each point by folding every event from the first (the reference answer)."""
    wanted = sorted(points)
    answers: dict[int, Registry] = {}
    registry = Registry()
    with EventStore.open_readonly(path) as store:
        if 0 in wanted:
            answers[0] = registry.copy()
        for event in store.read(lobby=LOBBY):
            apply(registry, event)
            if event.seq in wanted:
                answers[event.seq] = registry.copy()
    return answers


def timed_state(path: Path, **point: object) -> tuple[float, StatePoint]:
    start = time.perf_counter()
    result = replay.state(path, **point)
    return time.perf_counter() - start, result


def measure(label: str, path: Path, points: list[int], answers: dict[int, Registry]) -> list[float]:
    times = []
    for seq in points:
        elapsed, result = timed_state(path, at_seq=seq)
        assert result.registry == answers[seq], f"state at seq {seq} differs from a full fold"
        times.append(elapsed)
    print(f"  {label:<44} median {statistics.median(times):.3f} s, max {max(times):.3f} s "
          f"over {len(times)} points {'(within' if max(times) <= BUDGET else '(OVER'} the {BUDGET} s budget)")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--points", type=int, default=12, help="random points to query, plus the first and last")
    parser.add_argument("--dir", default=None, help="folder for the logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-replay-", dir=args.dir))
    try:
        print(f"# python bench/bench_replay.py {' '.join(argv or sys.argv[1:])}  (logs in {folder})")
        path = folder / "big.db"
        start = time.perf_counter()
        build_big_log(path, args.events, 10_000)
        print(f"built a {args.events:,}-event log with a snapshot every 10,000 events in "
              f"{time.perf_counter() - start:.1f} s")
        rng = random.Random(11)
        points = sorted({1, args.events, *(rng.randrange(1, args.events) for _ in range(args.points))})
        start = time.perf_counter()
        answers = full_folds(path, points)
        print(f"reference: full folds up to every point in one pass, {time.perf_counter() - start:.1f} s\n")

        print("replay.state(path, at_seq=N), whole call:")
        measure("log with snapshots (as the server writes it)", path, points, answers)

        bare = folder / "bare.db"
        shutil.copy(path, bare)
        with sqlite3.connect(bare) as conn:
            conn.execute("DELETE FROM snapshots")
        start = time.perf_counter()
        elapsed, result = timed_state(bare, at_seq=args.events)
        assert result.registry == answers[args.events]
        print(f"  {'log without snapshots, first query':<44} {elapsed:.3f} s (folds the log once, writes the "
              "sidecar index)")
        measure("log without snapshots, with the sidecar index", bare, points, answers)

        with open_log(path) as log:
            moments = [log.at_of(seq) for seq in points]
        times = []
        for seq, at in zip(points, moments):
            start = time.perf_counter()
            result = replay.state(path, at_time=iso_time(at))  # type: ignore[arg-type]
            times.append(time.perf_counter() - start)
            assert result.seq == seq and result.registry == answers[seq]
        print(f"  {'--at-time (binary search, then the registry)':<44} median {statistics.median(times):.3f} s, "
              f"max {max(times):.3f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
