"""What dual-write costs a sender, and what the spool costs while the secondary is down.

    python bench/bench_dual_spool.py [--count 2000] [--rounds 3]

One sender awaiting each ``bus.send`` (1 KiB), memory:// primary, a private
nats-server (file store, sync always) as the secondary, in one run:
NATS alone (the raw cost of the secondary), ``dual://`` with the default
``secondary=fail``, ``secondary=spool`` while NATS is up (the direct path) and
while it is stopped (each send = primary + a durable SQLite append), then the
time to drain the spool once NATS is back. Spool on the temp dir's disk.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

from squadbus.backends.dual import DualBackend
from squadbus.benchmarks.stats import Environment, Result, format_table, to_json
from squadbus.core.bus import Bus
from squadbus.testing.servers.nats import NatsServer

PAYLOAD = "x" * 1024


async def sends(url: str, name: str, count: int, server: NatsServer | None = None) -> tuple[Result, Bus]:
    """``count`` awaited sends on ``url``; stops ``server`` first when given (the outage case)."""
    bus = await Bus.from_url(url).start()
    await bus.send("pm", "dev-1", "warm-up")
    if server is not None:
        server.stop()
        await bus.send("pm", "dev-1", "first after the stop: waits publish_timeout, then spools")
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        await bus.send("pm", "dev-1", PAYLOAD)
        latencies.append((time.perf_counter() - t0) * 1000)
    return Result(name, count, time.perf_counter() - start, latencies), bus


async def drain(bus: Bus, server: NatsServer, count: int) -> Result:
    backend = bus.backend
    assert isinstance(backend, DualBackend)
    depth = int(backend.figures()["dual_spool_depth"])
    start = time.perf_counter()
    server.start()
    while backend.figures()["dual_spool_depth"]:
        await asyncio.sleep(0.01)
    return Result("spool drained to nats after restart", depth, time.perf_counter() - start,
                  notes="includes nats-py reconnecting (up to its reconnect wait)")


async def main(count: int, rounds: int) -> None:
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_no in range(rounds):
            with NatsServer(Path(tmp) / f"nats-{round_no}") as server:
                spool = Path(tmp) / f"spool-{round_no}.db"
                secondary = f"{server.url}?publish_timeout=1"
                for url, name in (
                    (server.url, "nats alone (raw secondary)"),
                    (f"dual://memory://|{secondary}", "dual secondary=fail, nats up"),
                    (f"dual://memory://|{secondary}|secondary=spool&spool={spool}", "dual secondary=spool, nats up"),
                ):
                    result, bus = await sends(url, name, count)
                    await bus.close()
                    results.append(result)
                url = f"dual://memory://|{secondary}|secondary=spool&spool={spool}"
                result, bus = await sends(url, "dual secondary=spool, nats down (spooled)", count, server)
                results.append(result)
                results.append(await drain(bus, server, count))
                await bus.close()
    print(format_table(results))
    print(to_json(results, environment=Environment.current().as_dict()))


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.rounds))
