"""Event store benchmark, run by hand (not a test):

    pip install -e . eventsourcing && python bench/bench_store.py [--events 1000000] [--dir /var/tmp]

Prints, in one run, side by side:
  (a) append throughput of our store at FULL and NORMAL durability with batches of 1, 64 and 1024 events;
  (c) the same workload through the ``eventsourcing`` library's SQLite recorder (one ``insert_events`` call
      per batch, so the same group commit); each batch size is measured in rounds that run the three in
      turn, and the ratio printed is the median of the rounds' own ratios, so that the machine's drift
      (20-40% between runs here) hits both stores alike;
  (b) the time to rebuild the registry of a 1,000,000-event log: the start-up path (``load_registry``:
      the latest snapshot, then the lifecycle events of the tail), the same without any snapshot (a log
      written before snapshots existed), and a full fold of every event, custom messages included, as
      ``lobby replay verify`` does (``rebuild(store.read())``).
Put the log on a real disk (``--dir``) to measure fsync; a tmpfs hides it.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from events import EventStore, Join, Link, Listen, Message, Unlink, rebuild  # noqa: E402
from events.model import dumps  # noqa: E402
from events.projection import Registry, apply  # noqa: E402

LOBBY, SESSION = "bench", "s1"
BATCHES = (1, 64, 1024)


def workload(count: int) -> list[Message]:
    """``count`` chat-sized custom messages, as a busy lobby logs them."""
    return [
        Message(lobby=LOBBY, session=SESSION, at=1_700_000_000_000_000 + i, username=f"user{i % 50}",
                message={"type": "game/move", "payload": {"x": i % 19, "y": i % 7, "turn": i}})
        for i in range(count)
    ]


def time_ours(folder: Path, durability: str, batch: int, seconds: float) -> float:
    path = folder / f"ours-{durability}-{batch}.db"
    events = workload(batch)
    with EventStore(path, durability=durability) as store:
        appended, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            store.append(events)
            appended += batch
    return appended / elapsed


def time_eventsourcing(folder: Path, batch: int, seconds: float) -> float | None:
    try:
        from eventsourcing.persistence import StoredEvent
        from eventsourcing.sqlite import SQLiteAggregateRecorder, SQLiteDatastore
    except ImportError:
        return None
    datastore = SQLiteDatastore(str(folder / f"es-{batch}.db"))
    recorder = SQLiteAggregateRecorder(datastore)
    recorder.create_table()
    events = workload(batch)
    originator = uuid.uuid4()
    version, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        # Encoded in the loop, as our append encodes (the recorder stores bytes: someone has to make them),
        # with the fastest encoder we know: ours, orjson output copied to its own size (see events.dumps).
        recorder.insert_events(
            [StoredEvent(originator_id=originator, originator_version=version + i, topic="game/move",
                         state=dumps(e.data())) for i, e in enumerate(events)]
        )
        version += batch
    return version / elapsed


def build_big_log(path: Path, count: int, snapshot_every: int) -> None:
    """A realistic log: 200 users coming and going, linking and unlinking, and mostly custom messages.
    Snapshots every ``snapshot_every`` events, as the server writes them."""
    rng = random.Random(7)
    at = 1_700_000_000_000_000
    registry = Registry()
    batch: list = []
    linked: list[str] = []
    with EventStore(path, durability="normal") as store:

        def emit(event) -> None:
            batch.append(event)
            apply(registry, event)

        emit(Listen(lobby=LOBBY, session=SESSION, at=at, port=8082))
        joined: set[str] = set()
        total = 1
        while total < count:
            at += 10
            name = f"user{rng.randrange(200)}"
            roll = rng.random()
            if name not in joined:
                emit(Join(lobby=LOBBY, session=SESSION, at=at, username=name))
                joined.add(name)
            elif roll < 0.03 and name not in linked:
                emit(Link(lobby=LOBBY, session=SESSION, at=at, username=name))
                linked.append(name)
            elif roll < 0.06 and name in linked:
                emit(Unlink(lobby=LOBBY, session=SESSION, at=at, username=name, reason="dropped"))
                linked.remove(name)
            elif linked:
                who = rng.choice(linked)
                emit(Message(lobby=LOBBY, session=SESSION, at=at, username=who,
                             message={"type": "game/move", "payload": {"n": total}}))
            else:
                continue
            total += 1
            if len(batch) == 1024 or total >= count:
                seqs = store.append(batch)
                registry.seq = seqs[-1]
                batch.clear()
                if registry.seq // snapshot_every != (registry.seq - len(seqs)) // snapshot_every:
                    store.save_snapshot(registry)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="size of the log to rebuild")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per append measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds per batch size; each runs ours FULL, eventsourcing and ours NORMAL in turn")
    parser.add_argument("--snapshot-every", type=int, default=10_000)
    parser.add_argument("--dir", default=None, help="folder for the logs (default: a temporary folder)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    try:
        print(f"# python bench/bench_store.py {' '.join(argv or sys.argv[1:])}  (logs in {folder})")
        print(f"\n(a, c) append throughput, events/s (higher is better): medians of {args.rounds} rounds, each")
        print("running the three in turn, so that the machine's drift hits them alike; the ratio is the median")
        print("of the rounds' own ratios")
        print(f"{'batch':>6} {'ours FULL':>12} {'ours NORMAL':>12} {'eventsourcing':>14} {'ours FULL / es':>15}"
              "  per round")
        for batch in BATCHES:
            seconds = args.seconds if batch > 1 else min(args.seconds, 0.5)
            full, normal, es = [], [], []
            for _ in range(args.rounds):
                full.append(time_ours(folder, "full", batch, seconds))
                es.append(time_eventsourcing(folder, batch, seconds))  # right after FULL: the pair it is compared to
                normal.append(time_ours(folder, "normal", batch, seconds))
            if es[0] is None:
                es_text, ratio, rounds = f"{'not installed':>14}", f"{'-':>15}", ""
            else:
                ratios = [f / e for f, e in zip(full, es)]
                es_text = f"{statistics.median(es):14,.0f}"
                ratio = f"{statistics.median(ratios):15.2f}"
                rounds = "  " + " ".join(f"{r:.2f}" for r in ratios)
            print(f"{batch:>6} {statistics.median(full):12,.0f} {statistics.median(normal):12,.0f} {es_text} {ratio}"
                  f"{rounds}")

        path = folder / "big.db"
        start = time.perf_counter()
        build_big_log(path, args.events, args.snapshot_every)
        print(f"\n(b) registry rebuild of a {args.events:,}-event log (built in {time.perf_counter() - start:.1f} s)")
        with EventStore.open_readonly(path) as store:
            start = time.perf_counter()
            registry = store.load_registry(LOBBY)
            startup = time.perf_counter() - start
            start = time.perf_counter()
            full = rebuild(store.read(lobby=LOBBY))
            fold = time.perf_counter() - start
        with EventStore(path) as store:
            store.db.execute("DELETE FROM snapshots")
            store.db.conn.commit()
            start = time.perf_counter()
            unsnapshotted = store.load_registry(LOBBY)
            no_snapshot = time.perf_counter() - start
        assert registry == full == unsnapshotted, "load_registry differs from a full fold"
        print(f"  start-up path (latest snapshot + tail): {startup:.3f} s")
        print(f"  start-up path without any snapshot:     {no_snapshot:.3f} s")
        print(f"  full fold of every event (verify):      {fold:.3f} s  ({args.events / fold:,.0f} events/s)")
        print(f"  registry: {len(full.users)} users, {len(full.linked())} linked, at seq {full.seq}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
