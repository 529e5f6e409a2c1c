"""Kafka benchmark: squadbus vs raw aiokafka on a private tansu broker.

    python bench/bench_kafka.py [--count 10000] [--rate 1000] [--partitions 8] [--rounds 3]

Starts tansu on a free loopback port, runs squadbus.benchmarks.kafka.run
(throughput publish -> consume and open-loop end-to-end latency, 1 KiB
messages, each beside raw aiokafka doing the same work), prints a table,
the ratios and one JSON line, and stops the broker.

The goal of issue 19 (>= 0.9 of raw for a group subscriber) is judged like with
like on two lines: (a) ``publish_many`` with inboxes on (the default: two
records per direct message) over raw aiokafka writing those two records;
(b) ``publish_many`` with ``inboxes=off`` over raw writing one record.
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
    parser.add_argument("--rounds", type=int, default=kafka_bench.ROUNDS, help="rounds of the throughput lines")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with TansuServer() as server:
        url = (
            f"{server.url}?partitions={args.partitions}&idempotence=off"
            "&session_timeout_ms=3000&heartbeat_interval_ms=1000"
        )
        assert server.proc is not None
        results = asyncio.run(kafka_bench.run(url=url, count=args.count, rate=args.rate, broker_pid=server.proc.pid,
                                              rounds_run=args.rounds))
    raw_tp, ours_tp, raw_lat, ours_lat, raw_awaited, ours_many, ours_many_single, raw_two = results
    summary = {
        "ratio_a_inboxes_on_vs_raw_2_records": round(ratio(ours_many, raw_two), 3),
        "ratio_b_inboxes_off_vs_raw_1_record": round(ratio(ours_many_single, raw_tp), 3),
        "ratio_a_paired": _rounded(ours_many.ratio),
        "ratio_b_paired": _rounded(ours_many_single.ratio),
        "send_ratio_vs_raw_2_records": round(ratio(ours_tp, raw_two), 3),
        "throughput_ratio": round(ratio(ours_tp, raw_tp), 3),
        "publish_many_ratio": round(ratio(ours_many, raw_tp), 3),
        "publish_many_inboxes_off_ratio": round(ratio(ours_many_single, raw_tp), 3),
        "throughput_ratio_vs_awaited_raw": round(ratio(ours_tp, raw_awaited), 3),
        "p50_ms": {"squadbus": ours_lat.summary()["p50_ms"], "raw": raw_lat.summary()["p50_ms"]},
        "p99_ms": {"squadbus": ours_lat.summary()["p99_ms"], "raw": raw_lat.summary()["p99_ms"]},
        "p999_ms": {"squadbus": ours_lat.summary()["p999_ms"], "raw": raw_lat.summary()["p999_ms"]},
        "cpu_us_per_msg": {
            r.name: {"client": _rounded(r.client_us), "broker": _rounded(r.broker_us)}
            for r in results if isinstance(r, kafka_bench.CpuResult)
        },
    }
    lines = [
        format_table(results),
        f"(a) publish_many, inboxes on (2 records/msg) / raw writing the same 2 records = "
        f"{summary['ratio_a_inboxes_on_vs_raw_2_records']} (median of per-round ratios "
        f"{summary['ratio_a_paired']}; goal >= 0.9); "
        f"Bus.send / the same raw = {summary['send_ratio_vs_raw_2_records']}",
        f"(b) publish_many, inboxes=off (1 record/msg) / raw writing 1 record = "
        f"{summary['ratio_b_inboxes_off_vs_raw_1_record']} (median of per-round ratios "
        f"{summary['ratio_b_paired']}; goal >= 0.9)",
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


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


if __name__ == "__main__":
    main()
