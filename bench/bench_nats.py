"""NATS JetStream benchmark: squadbus vs raw nats-py on a private nats-server, same run.

    python bench/bench_nats.py [--count 20000] [--rate 1000] [--profile durable|fast] [--no-sync-always]

The server runs with ``sync_interval: always`` (fsync per write) unless
``--no-sync-always``; ``--profile fast`` uses a memory-storage stream.
Prints a table, the throughput ratio (target >= 0.8) and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from squadbus.benchmarks import nats as nats_bench
from squadbus.benchmarks.stats import Environment, format_table, to_json
from squadbus.testing.servers.nats import NatsServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages for the throughput test")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop rate for the latency test")
    parser.add_argument("--profile", choices=("durable", "fast"), default="durable")
    parser.add_argument("--no-sync-always", action="store_true", help="server fsyncs every 2 min, not per write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="squadbus-bench-nats-") as tmp, \
            NatsServer(Path(tmp), sync_always=not args.no_sync_always) as server:
        url = f"{server.url}?profile={args.profile}"
        results = asyncio.run(nats_bench.run(url=url, count=args.count, rate=args.rate))
    facts = nats_bench.summary(results)
    out = sys.stdout
    out.write(format_table(results) + "\n")
    out.write(f"throughput ratio squadbus/raw = {facts['throughput_ratio']:.2f} (target >= 0.8)\n")
    document = json.loads(to_json(
        results, **facts, profile=args.profile, sync_always=not args.no_sync_always,
        environment=Environment.current().as_dict(),
    ))
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
