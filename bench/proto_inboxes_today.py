"""Baseline for docs/design/inboxes.md: today's ``bus.inbox(agent)`` (per-agent subscriptions), and GC pauses.

    .venv/bin/python bench/proto_inboxes_today.py baseline --backend redis --agents 40
    .venv/bin/python bench/proto_inboxes_today.py baseline --backend nats --agents 300
    .venv/bin/python bench/proto_inboxes_today.py baseline --backend kafka --agents 20
    .venv/bin/python bench/proto_inboxes_today.py baseline --backend memory --agents 300
    .venv/bin/python bench/proto_inboxes_today.py gc --agents 10000 [--freeze] [--rate 280 --seconds 20]

``baseline``: a Bus on a private server (started here, stopped by PID in
``finally``) opens N inboxes with the released code (``broadcasts=False``, so
one subscription per agent: the cheapest case today); time to open, broker
resources (Redis CLIENT LIST, NATS consumers, Kafka group count is N), RSS,
and one message to each agent, delivered and acked.

``gc``: memory backend, N inboxes (with broadcasts: today's default), one
task per agent iterating its inbox; messages to random agents at ``--rate``.
Every collection is timed with ``gc.callbacks``; ``--freeze`` calls
``gc.freeze()`` once the inboxes are open (their objects leave the
collector's generations). Prints the longest pause per generation and the
end-to-end p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from squadbus.core.bus import Bus
from squadbus.core.inbox import Inbox


def rss_mib() -> float:
    """Resident set size of this process in MiB (from /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def server_for(backend: str) -> Iterator[str]:
    """A private server for ``backend`` and its URL; stopped by PID on exit."""
    if backend == "memory":
        yield "memory://"
    elif backend == "redis":
        from squadbus.testing.servers.redis import RedisServer

        with RedisServer("fast") as redis:
            yield redis.url
    elif backend == "nats":
        from squadbus.testing.servers.nats import NatsServer

        with tempfile.TemporaryDirectory(prefix="proto-today-") as tmp, NatsServer(Path(tmp), sync_always=False) as n:
            yield n.url
    else:
        from squadbus.testing.servers.kafka import TansuServer

        with TansuServer() as kafka:
            yield kafka.url


async def resources(backend: str, url: str) -> dict[str, object]:
    if backend == "redis":
        import redis.asyncio as aioredis

        admin = aioredis.Redis.from_url(url)
        try:
            return {"broker_clients": len(await admin.client_list()) - 1}
        finally:
            await admin.aclose()
    if backend == "nats":
        import nats

        nc = await nats.connect(url)
        try:
            return {"jetstream_consumers": (await nc.jetstream().account_info()).consumers}
        finally:
            await nc.close()
    return {}


async def baseline(backend: str, agents: int) -> dict[str, object]:
    with server_for(backend) as url:
        rss0 = rss_mib()
        async with Bus.from_url(url) as bus:
            inboxes = [bus.inbox(f"a{i}", broadcasts=False) for i in range(agents)]
            t0 = time.perf_counter()
            error = None
            opened = 0
            try:
                for inbox in inboxes:
                    await inbox.open()
                    opened += 1
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            open_s = time.perf_counter() - t0
            facts = await resources(backend, url)
            t1 = time.perf_counter()
            sent = 0
            try:
                for i in range(opened):
                    await bus.send("pm", f"a{i}", "hello")
                    sent += 1
            except Exception as exc:
                error = (error or "") + f" send: {type(exc).__name__}: {exc}"[:200]

            async def take(inbox: Inbox) -> int:
                async with await inbox.get(timeout=30):
                    return 1

            taken = await asyncio.gather(*(take(inboxes[i]) for i in range(sent)), return_exceptions=True)
            got = sum(1 for t in taken if t == 1)
            deliver_s = time.perf_counter() - t1
            rss = rss_mib() - rss0
            t2 = time.perf_counter()
        close_s = time.perf_counter() - t2
    return {
        "backend": backend, "design": "today: one subscription per inbox", "agents": agents, "opened": opened,
        "error": error, "sent": sent, "open_s": round(open_s, 3), "deliver_1_each_s": round(deliver_s, 3),
        "delivered": got, "client_rss_delta_mib": round(rss, 1), "close_s": round(close_s, 3), **facts,
    }


async def gc_pauses(agents: int, freeze: bool, rate: float, seconds: float) -> dict[str, object]:
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = [0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    latencies: list[float] = []
    rss0 = rss_mib()
    async with Bus.from_url("memory://") as bus:
        inboxes = [bus.inbox(f"a{i}") for i in range(agents)]
        t0 = time.perf_counter()
        for inbox in inboxes:
            await inbox.open()
        open_s = time.perf_counter() - t0

        async def agent(inbox: Inbox) -> None:
            async for delivery in inbox:
                async with delivery:
                    latencies.append(time.time() - float(delivery.message.content))

        tasks = [asyncio.create_task(agent(inbox)) for inbox in inboxes]
        await asyncio.sleep(0.5)
        gc.collect()
        if freeze:
            gc.freeze()
        gc.callbacks.append(timer)
        try:
            total = int(rate * seconds)
            t1 = time.perf_counter()
            for n in range(total):
                await bus.send("pm", f"a{random.randrange(agents)}", repr(time.time()))
                delay = t1 + (n + 1) / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await asyncio.sleep(0.5)
            # One full collection as it would come anyway, timed the same way.
            gc.collect()
        finally:
            gc.callbacks.remove(timer)
        rss = rss_mib() - rss0
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=10)
    lat = sorted(latencies)
    return {
        "backend": "memory", "case": "GC pauses with N open inboxes", "agents": agents, "freeze": freeze,
        "open_s": round(open_s, 3), "rss_delta_mib": round(rss, 1), "tracked_objects": len(gc.get_objects()),
        "rate": rate, "sent": int(rate * seconds), "delivered": len(lat),
        "collections": {g: len(p) for g, p in pauses.items()},
        "max_pause_ms": {g: round(max(p, default=0) * 1000, 1) for g, p in pauses.items()},
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("baseline", "gc"))
    parser.add_argument("--backend", choices=("memory", "redis", "nats", "kafka"), default="memory")
    parser.add_argument("--agents", type=int, default=300)
    parser.add_argument("--freeze", action="store_true")
    parser.add_argument("--rate", type=float, default=280.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    if args.what == "baseline":
        result = asyncio.run(baseline(args.backend, args.agents))
    else:
        result = asyncio.run(gc_pauses(args.agents, args.freeze, args.rate, args.seconds))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
