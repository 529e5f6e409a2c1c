"""Redis restart: when do N clients read again? (the retry delays of squadbus.core.backoff)

    .venv/bin/python bench/bench_reconnect.py [--clients 20] [--down 0.5:3] [--runs 6] [--seed 1]

``--clients`` Buses in one process (a connection pool each), each with one subscription without a
group on the squad broadcast (the XREAD watcher, backends/redis/watcher.py, which retries with the
``RECONNECT`` backoff). Redis (durable profile: AOF, so streams survive) is killed with SIGKILL and
started again ``--down`` seconds later; as soon as it answers PING a fresh Bus broadcasts one
message. Per client: seconds from "Redis answers" to that message's delivery, about when that
client's backoff let it read again. ``--down A:B`` draws each run's outage uniformly from A to B
(the same draws for the same ``--seed``): how long a client waits depends on where its retry
schedule stands when Redis returns, so one fixed outage favours one schedule by luck.

One JSON line per run (min, median, max, and how many 10 ms slots after the restart the deliveries
fell in: all clients in one or two slots = they retried in lockstep), then one summary line (mean
and max over every client of every run). To compare with another tree, put its ``src`` first:
``PYTHONPATH=/path/to/old/src .venv/bin/python bench/bench_reconnect.py``. Starts its own
redis-server and stops it by PID.

``--model``: no server; the same question answered by the arithmetic of ``BackoffPolicy`` (each
retry after a refused connection taken as instant): the wait from the end of an outage to the next
retry, for 20,000 outages drawn from each range, without jitter and with 0.25, 0.5 and 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import squadbus
from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.testing.servers.redis import RedisServer


async def one_run(server: RedisServer, clients: int, down: float, waits: list[float]) -> dict[str, object]:
    url = f"{server.url}?profile=durable&publish_timeout=5"
    arrived: list[list[float]] = [[] for _ in range(clients)]
    buses = [Bus.from_url(url) for _ in range(clients)]
    try:
        for i, bus in enumerate(buses):
            await bus.start()

            async def handler(delivery: Delivery, mine: list[float] = arrived[i]) -> None:
                mine.append(time.monotonic())

            await bus.subscribe(subjects.BROADCAST, handler)
        async with Bus.from_url(url) as sender:
            await sender.broadcast("bench", "warm-up")
        await _until(lambda: all(len(a) == 1 for a in arrived), 30.0, "the warm-up on every client")
        server.kill9()
        await asyncio.sleep(down)
        await asyncio.to_thread(server.start)
        ready = time.monotonic()
        async with Bus.from_url(url) as sender:
            await sender.broadcast("bench", "after the restart")
        sent = time.monotonic() - ready
        await _until(lambda: all(len(a) >= 2 for a in arrived), 60.0, "the message after the restart")
    finally:
        for bus in buses:
            await bus.close()
    delays = sorted(a[1] - ready for a in arrived)
    waits.extend(delays)
    return {
        "clients": clients, "down_s": round(down, 2), "publish_after_restart_s": round(sent, 3),
        "min_s": round(delays[0], 3), "median_s": round(statistics.median(delays), 3),
        "max_s": round(delays[-1], 3), "slots_10ms": len({int(d * 100) for d in delays}),
    }


def model(seed: int) -> None:
    """Print the wait after an outage under RECONNECT's start and cap, by jitter and outage length."""
    from squadbus.core.backoff import RECONNECT, Backoff  # here: an older tree (PYTHONPATH) has no core.backoff
    rng = random.Random(seed)
    for jitter in (0.0, 0.25, 0.5, 1.0):
        policy = dataclasses.replace(RECONNECT, jitter=jitter)
        for low, high in ((0.5, 3.0), (3.0, 10.0), (10.0, 60.0)):
            waits = []
            for _ in range(20_000):
                outage, at, backoff = rng.uniform(low, high), 0.0, Backoff(policy, rand=rng.random)
                while at < outage:
                    at += backoff.next()
                waits.append(at - outage)
            waits.sort()
            print(json.dumps({"model": True, "jitter": jitter, "outage_s": f"{low:g}-{high:g}",
                              "mean_s": round(statistics.mean(waits), 3), "p50_s": round(waits[10_000], 3),
                              "p99_s": round(waits[19_800], 3), "max_s": round(waits[-1], 3)}))


async def _until(done: object, timeout: float, what: str) -> None:
    assert callable(done)
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        await asyncio.sleep(0.005)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--down", default="0.5:3", help="seconds Redis is down: A, or A:B drawn per run")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", action="store_true", help="no server: the backoff arithmetic only")
    args = parser.parse_args()
    if args.model:
        model(args.seed)
        return
    low, _, high = args.down.partition(":")
    draw = random.Random(args.seed)
    logging.getLogger("squadbus").setLevel(logging.ERROR)  # one warning per client per outage otherwise
    print(json.dumps({"squadbus": str(Path(squadbus.__file__).parent)}))
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer("durable", directory=directory)
        server.start()
        try:
            waits: list[float] = []
            for _ in range(args.runs):
                down = draw.uniform(float(low), float(high or low))
                print(json.dumps(await one_run(server, args.clients, down, waits)), flush=True)
        finally:
            server.cleanup()
    print(json.dumps({"summary": True, "runs": args.runs, "clients": args.clients, "down_s": args.down,
                      "mean_s": round(statistics.mean(waits), 3), "max_s": round(max(waits), 3)}))


if __name__ == "__main__":
    asyncio.run(main())
