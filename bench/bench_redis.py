"""Redis benchmark: squadbus vs raw redis-py on a private redis-server, same run.

    python bench/bench_redis.py [--count 20000] [--rate 1000] [--profile fast|durable] [--rounds 7] [--concurrent]

``--concurrent`` runs only concurrent ``Bus.send`` beside redis-py doing the same pattern.

Prints a table, the throughput ratio (target >= 0.8) and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys

from squadbus.benchmarks import redis as redis_bench
from squadbus.benchmarks.stats import Environment, format_table, to_json
from squadbus.testing.servers.redis import RedisServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="messages for the throughput test")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop rate for the latency test")
    parser.add_argument("--profile", choices=("fast", "durable"), default="fast")
    parser.add_argument("--rounds", type=int, default=redis_bench.ROUNDS, help="interleaved throughput rounds")
    parser.add_argument("--concurrent", action="store_true",
                        help="only concurrent Bus.send beside redis-py doing the same pattern")
    args = parser.parse_args()
    if args.concurrent:
        concurrent_only(args)
        return
    with RedisServer(args.profile) as server:
        url = server.url + ("?profile=durable" if args.profile == "durable" else "")
        results = asyncio.run(redis_bench.run(url=url, count=args.count, rate=args.rate, rounds=args.rounds))
    facts = redis_bench.summary(results)
    out = sys.stdout
    out.write(format_table(results) + "\n")
    out.write(f"throughput ratio squadbus/raw, same pattern (publish_many -> group handler vs pipelined XADD -> "
              f"XREADGROUP/XACK) = {facts['throughput_ratio']:.2f} (target >= 0.8); into a batch handler "
              f"{facts['batch_handler_ratio']:.2f}; concurrent Bus.send (a task per message) "
              f"{facts['concurrent_send_ratio']:.2f}; each the median of the per-round ratios; concurrent Bus.send vs "
              f"redis-py with a task per message auto-pipelined (the same pattern) "
              f"{facts['concurrent_send_same_pattern_ratio']:.2f}, that raw pattern vs the raw pipeline "
              f"{facts['raw_concurrent_vs_pipeline']:.2f} (median rounds)\n")
    document = json.loads(to_json(results, **facts, profile=args.profile, environment=Environment.current().as_dict()))
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


def concurrent_only(args: argparse.Namespace) -> None:
    with RedisServer(args.profile) as server:
        url = server.url + ("?profile=durable" if args.profile == "durable" else "")
        results = asyncio.run(redis_bench.run_concurrent(url=url, count=args.count, rounds=args.rounds))
    out = sys.stdout
    out.write(format_table(results) + "\n")
    ours = results[0]
    out.write(f"concurrent Bus.send / redis-py same pattern = {ours.ratio or math.nan:.2f} "
              f"(median of per-round ratios; target >= 0.8)\n")
    document = json.loads(to_json(results, concurrent_send_same_pattern_ratio=round(ours.ratio or math.nan, 3),
                                  profile=args.profile, environment=Environment.current().as_dict()))
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
