"""Memory backend: throughput, latency at 10k msgs/s, 100 vs 10,000 agents, and the guide's bus, in one run.

Run: python bench/bench_memory.py [--count 200000] [--rate 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from squadbus.benchmarks import memory
from squadbus.benchmarks.stats import Environment, format_table, ratio, to_json


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=10_000.0)
    args = parser.parse_args()
    results = asyncio.run(memory.run(count=args.count, rate=args.rate))
    by_name = {r.name: r for r in results}
    ours = by_name["squadbus memory direct (1 agents)"]
    ratios = {
        "squadbus/guide direct": ratio(ours, by_name["guide MessageBus direct (1 agents)"]),
        "squadbus/guide broadcast x1000": ratio(by_name["squadbus memory broadcast x1000"],
                                                by_name["guide MessageBus broadcast x1000"]),
        "10000 agents / 100 agents": ratio(by_name["squadbus memory direct (10000 agents)"],
                                           by_name["squadbus memory direct (100 agents)"]),
        "squadbus/raw queue": ratio(ours, by_name["raw asyncio.Queue (no envelope)"]),
    }
    sys.stdout.write(format_table(results) + "\n\n")
    for name, value in ratios.items():
        sys.stdout.write(f"ratio {name:34} {value:6.2f}\n")
    sys.stdout.write(to_json(results, ratios=ratios, environment=Environment.current().as_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
