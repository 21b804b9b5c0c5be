"""Hostile input at volume, run by hand (CI runs a small count through tests/test_hostile.py):

    python3 bench/hostile.py [--frames 100000] [--attackers 8] [--honest 4]

Starts a server (the conformance app) on a fresh log, measures honest clients' echo round trips alone, then
again while attacker processes throw generated frames at it: malformed JSON, deep nesting, huge strings,
wrong types, binary garbage, floods, link storms with bad versions and usernames, abrupt closes in the
middle of a handshake. Checks that the server stays up (``/health``), that honest clients never see an
error or lose their link, that their p99 round trip stays within the bound (``--bound-ms`` over the
baseline p99), and that ``lobby replay verify`` passes on the log. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BOUND_MS = 250.0


def hostile_frames(rng: random.Random) -> list:
    """One batch of generated hostile frames (str or bytes); ``None`` means: close abruptly now."""
    depth = rng.choice([100, 1_000, 5_000, 50_000])
    kinds = [
        lambda: "{" * rng.randint(1, 50),
        lambda: '{"type": "krmx/link", "payload": ' + "[" * depth + "]" * depth + "}",
        lambda: json.dumps({"type": "game/x", "payload": "A" * rng.choice([10_000, 300_000])}),
        lambda: json.dumps({"type": rng.choice([1, None, [], {}, True])}),
        lambda: json.dumps(rng.choice([[], 1, "krmx/link", None, 3.5])),
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),
        lambda: json.dumps({"type": "krmx/link", "payload": {"username": rng.choice(["", "x", "-bad", "a" * 40,
                                                                                        "ünï", "ok\n"]),
                                                               "version": "0.5.4"}}),
        lambda: json.dumps({"type": "krmx/link", "payload": {"username": f"att{rng.randrange(10_000)}",
                                                               "version": rng.choice(["9.9", "0.4.1", "", "x"])}}),
        lambda: json.dumps({"type": "krmx/link", "payload": {"username": 5, "version": []}}),
        lambda: json.dumps({"type": "krmx/" + rng.choice(["unlink", "leave", "joined", "boom"])}),
        lambda: '{"type": "x", "payload": NaN}',
        lambda: '{"type": "x"} trailing',
    ]
    frames: list = [rng.choice(kinds)() for _ in range(rng.randint(5, 40))]
    if rng.random() < 0.3:  # a flood: the same frame many times, to meet the rate limit
        frames.extend([frames[0]] * 1_500)
    if rng.random() < 0.2:  # link, then spam custom messages as a linked user
        frames.insert(0, json.dumps({"type": "krmx/link", "payload": {"username": f"spam{rng.randrange(50)}",
                                                                       "version": "0.5.4"}}))
    if rng.random() < 0.3:
        frames.append(None)
    return frames


def attacker(url: str, port: int, frames: int, seed: int, sent: multiprocessing.Value) -> None:
    asyncio.run(_attack(url, port, frames, seed, sent))


async def _attack(url: str, port: int, frames: int, seed: int, sent: multiprocessing.Value) -> None:
    from websockets.asyncio.client import connect

    rng = random.Random(seed)
    count = 0
    while count < frames:
        if rng.random() < 0.1:  # an abrupt close in the middle of a handshake
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
                await writer.drain()
                writer.transport.abort()
            except OSError:
                pass
            count += 1
            continue
        try:
            async with connect(url, max_size=None, open_timeout=10, close_timeout=1) as ws:
                for frame in hostile_frames(rng):
                    if frame is None:
                        ws.transport.abort()
                        break
                    await ws.send(frame)
                    count += 1
                    if count % 200 == 0:
                        await asyncio.sleep(0)  # let replies drain
        except Exception:  # cut off, refused, aborted: the attacker just goes on
            pass
    with sent.get_lock():
        sent.value += count


async def honest_client(url: str, name: str, stop: asyncio.Event, rtts: list, errors: list) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "krmx/link", "payload": {"username": name, "version": "0.5.4"}}))
        while json.loads(await ws.recv()) != {"type": "krmx/linked", "payload": {"username": name}}:
            pass
        counter = 0
        while not stop.is_set():
            counter += 1
            started = time.perf_counter()
            await ws.send(json.dumps({"type": "conf/echo", "payload": counter}))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame == {"type": "conf/echoed", "payload": counter}:
                    break
                if frame.get("type") in ("krmx/rejected", "conf/error") or frame == {
                    "type": "krmx/unlinked", "payload": {"username": name}
                }:
                    errors.append(frame)
            rtts.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.01)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values, default=0.0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def measure(url: str, honest: int, seconds: float, attack=None) -> tuple[list[float], list]:
    stop = asyncio.Event()
    rtts: list[float] = []
    errors: list = []
    clients = [asyncio.create_task(honest_client(url, f"honest{i}", stop, rtts, errors)) for i in range(honest)]
    if attack is None:
        await asyncio.sleep(seconds)
    else:
        await asyncio.to_thread(attack)
    stop.set()
    for task in clients:
        try:
            await asyncio.wait_for(task, 30)
        except Exception as error:  # a lost link or connection is an error for an honest client
            errors.append(repr(error))
    return rtts, errors


def run(frames: int = 100_000, attackers: int = 8, honest: int = 4, bound_ms: float = DEFAULT_BOUND_MS,
        baseline_s: float = 3.0) -> dict:
    """Run the whole scenario; return a report with ``ok`` and the measurements."""
    folder = Path(tempfile.mkdtemp(prefix="krmx-hostile-"))
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.conformance", "--port", str(port), "--db", str(folder / "lobby.db")],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.05)
        baseline, base_errors = asyncio.run(measure(url, honest, baseline_s))
        sent = multiprocessing.Value("q", 0)

        def attack() -> None:
            procs = [
                multiprocessing.Process(target=attacker, args=(url, port, frames // attackers, seed, sent))
                for seed in range(attackers)
            ]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()

        started = time.perf_counter()
        attacked, errors = asyncio.run(measure(url, honest, 0, attack))
        attack_s = time.perf_counter() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            health = json.loads(response.read())
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(10)
        verify = subprocess.run(
            [sys.executable, "-m", "lobby", "replay", "verify", str(folder / "lobby.db")],
            cwd=ROOT, capture_output=True, text=True,
        )
        report = {
            "frames_sent": sent.value,
            "attack_s": round(attack_s, 1),
            "baseline_p99_ms": round(p99(baseline), 2),
            "attack_p99_ms": round(p99(attacked), 2),
            "attack_p50_ms": round(statistics.median(attacked), 2) if attacked else None,
            "honest_round_trips": len(attacked),
            "honest_errors": base_errors + errors,
            "health_status": health["status"],
            "server_exit_code": exit_code,
            "verify_exit_code": verify.returncode,
            "verify_output": verify.stdout[-2000:] + verify.stderr[-2000:],
        }
        report["ok"] = (
            report["frames_sent"] >= frames
            and not report["honest_errors"]
            and report["health_status"] == "listening"
            and exit_code == 0
            and verify.returncode == 0
            and report["attack_p99_ms"] <= report["baseline_p99_ms"] + bound_ms
        )
        return report
    finally:
        if server.poll() is None:
            server.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--attackers", type=int, default=8)
    parser.add_argument("--honest", type=int, default=4)
    parser.add_argument("--bound-ms", type=float, default=DEFAULT_BOUND_MS,
                        help="allowed p99 round trip over the baseline p99 while attacked")
    args = parser.parse_args(argv)
    print(f"# python3 bench/hostile.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    report = run(args.frames, args.attackers, args.honest, args.bound_ms)
    for key, value in report.items():
        print(f"{key:>20}: {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
