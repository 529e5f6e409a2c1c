"""Kafka benchmark: squadbus vs raw aiokafka on a private tansu broker.

    python bench/bench_kafka.py [--count 20000] [--rate 1000] [--partitions 8]

Starts tansu on a free loopback port, runs squadbus.benchmarks.kafka.run
(throughput publish -> consume and open-loop end-to-end latency, 1 KiB
messages, each beside raw aiokafka doing the same work), prints a table,
the ratios and one JSON line, and stops the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging

from squadbus.benchmarks import kafka as kafka_bench
from squadbus.benchmarks.stats import Environment, format_table, ratio, to_json
from squadbus.testing.servers.kafka import TansuServer

logger = logging.getLogger("bench.kafka")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages per throughput round")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop rate, msgs/s")
    parser.add_argument("--partitions", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with TansuServer() as server:
        url = (
            f"{server.url}?partitions={args.partitions}&idempotence=off"
            "&session_timeout_ms=3000&heartbeat_interval_ms=1000"
        )
        results = asyncio.run(kafka_bench.run(url=url, count=args.count, rate=args.rate))
    raw_tp, ours_tp, raw_lat, ours_lat, raw_awaited, ours_many, ours_many_single = results
    summary = {
        "throughput_ratio": round(ratio(ours_tp, raw_tp), 3),
        "publish_many_ratio": round(ratio(ours_many, raw_tp), 3),
        "publish_many_inboxes_off_ratio": round(ratio(ours_many_single, raw_tp), 3),
        "throughput_ratio_vs_awaited_raw": round(ratio(ours_tp, raw_awaited), 3),
        "p50_ms": {"squadbus": ours_lat.summary()["p50_ms"], "raw": raw_lat.summary()["p50_ms"]},
        "p99_ms": {"squadbus": ours_lat.summary()["p99_ms"], "raw": raw_lat.summary()["p99_ms"]},
        "p999_ms": {"squadbus": ours_lat.summary()["p999_ms"], "raw": raw_lat.summary()["p999_ms"]},
    }
    lines = [
        format_table(results),
        f"throughput ratio squadbus/raw = {summary['throughput_ratio']} (target >= 0.8); "
        f"vs raw with per-record awaited sends = {summary['throughput_ratio_vs_awaited_raw']}; "
        f"publish_many vs raw = {summary['publish_many_ratio']} "
        f"(inboxes=off, one record per message as raw writes: {summary['publish_many_inboxes_off_ratio']})",
        f"latency p50 squadbus {summary['p50_ms']['squadbus']} ms vs raw {summary['p50_ms']['raw']} ms; "
        f"p99 {summary['p99_ms']['squadbus']} vs {summary['p99_ms']['raw']} ms",
        json.dumps(json.loads(to_json(
            results, bench="kafka", broker="tansu 0.6.0", environment=Environment.current().as_dict(), **summary
        ))),
    ]
    # The benchmark's output is its product: write it to stdout without print().
    import sys

    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
