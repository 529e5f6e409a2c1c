"""The raw aiokafka client on tansu at a squad's rate: how its fetch wait bounds end-to-end latency.

    python bench/bench_kafka_fetch_wait.py [--rate 280] [--seconds 10] [--consumers 1 4]
                                           [--fetch-max-wait-ms 100 25 10] [--runs 2]

No squadbus in the path: one producer process sends ``--rate`` records/s (``acks=all``, no linger, each
send awaited, keyed by 10,000 agent ids) to a fresh topic of 8 partitions; ``--consumers`` processes read
them, each assigned the partitions ``p % consumers == i`` (no group: no join, no commit), with the given
``fetch_max_wait_ms``. Latency = ``time.time()`` when ``getmany`` hands the record over - ``time.time()``
before its send (one machine, one clock). Also: the producer's ack latency and the broker's CPU over the
sending (``/proc``). Each case starts its own tansu (memory storage) and stops it by PID.

Why it is here (issue 15): ``squadbus simulate --scenario 5`` on Kafka misses its p99 < 50 ms. Apache Kafka
answers a waiting fetch as soon as a record arrives (``fetch.min.bytes=1``), so ``fetch_max_wait_ms`` costs
a busy consumer no latency. tansu does not wake a waiting fetch on a write: its fetch (``fetch.rs``) reads
its storage, sleeps, and reads again within ``max_wait``. Measured here (2026-12-05, tansu 0.6.0, 1 and 4
consumers alike): at 70 and 280 records/s with the default 100 ms, p50 27 ms and p99 53 ms (records wait
for a ~53 ms polling cycle); 25 ms: p99 15-18 ms; 10 ms: p99 8-9 ms, the broker's CPU 0.09 -> 0.23-0.3 of a
core; at 10 records/s, 100 ms: p50 3.4 ms, but 500 ms: p50 123 ms, max 250 ms. So at a squad's rate the
raw client on tansu misses 50 ms at p99 by itself, and lowering the wait trades it for the broker's CPU;
``simulate``'s figures are read against these (docs/scaling.md). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from squadbus.benchmarks.resources import cpu_reading
from squadbus.benchmarks.stats import percentile
from squadbus.testing.servers.kafka import TansuServer

PARTITIONS = 8
AGENTS = 10_000
LINGER_S = 3.0  # consumers read this long after the producer's last send


def consume(bootstrap: str, topic: str, index: int, consumers: int, wait_ms: int, until: float, out: str) -> None:
    """One consumer process: the latency of every record of its partitions, written to ``out`` as JSON."""

    async def run() -> list[float]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    fetch_max_wait_ms=wait_ms, auto_offset_reset="latest")
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(PARTITIONS) if p % consumers == index]
            consumer.assign(partitions)
            await consumer.seek_to_end()
            for tp in partitions:
                await consumer.position(tp)
            await asyncio.to_thread(Path(f"{out}.ready").touch)
            latencies: list[float] = []
            while time.time() < until:
                batch = await consumer.getmany(timeout_ms=200)
                now = time.time()
                latencies.extend(now - json.loads(r.value)["t"] for records in batch.values() for r in records)
        finally:
            await consumer.stop()
        return latencies

    Path(out).write_text(json.dumps(asyncio.run(run())))


def produce(bootstrap: str, topic: str, rate: float, seconds: float, out: str) -> None:
    """The producer process: ``rate`` sends/s for ``seconds`` (open loop), each ack's latency to ``out``."""

    async def run() -> list[float]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        acks: list[float] = []
        keys = random.Random(0)

        async def send() -> None:
            sent_at = time.time()
            key = f"agent-{keys.randrange(AGENTS)}".encode()
            await producer.send_and_wait(topic, json.dumps({"t": sent_at}).encode(), key=key)
            acks.append(time.time() - sent_at)

        try:
            pending: set[asyncio.Task[None]] = set()
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                n += 1
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.get_running_loop().create_task(send())
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return acks

    Path(out).write_text(json.dumps(asyncio.run(run())))


def ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 2)


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


def one_run(consumers: int, wait_ms: int, rate: float, seconds: float, workdir: Path) -> dict[str, object]:
    spawn = multiprocessing.get_context("spawn")
    with TansuServer() as server:
        assert server.proc is not None
        topic = f"fw-{uuid.uuid4().hex[:8]}"
        asyncio.run(create_topic(server.bootstrap, topic))
        until = time.time() + 30 + seconds + LINGER_S  # bounds a consumer if the producer never starts
        outs = [str(workdir / f"{topic}-c{i}") for i in range(consumers)]
        readers = [spawn.Process(target=consume, args=(server.bootstrap, topic, i, consumers, wait_ms, until, out))
                   for i, out in enumerate(outs)]
        for reader in readers:
            reader.start()
        try:
            deadline = time.monotonic() + 30
            while not all(Path(f"{out}.ready").exists() for out in outs):
                if time.monotonic() > deadline:
                    raise RuntimeError("the consumers did not start within 30 s")
                time.sleep(0.05)
            acks_out = str(workdir / f"{topic}-p")
            writer = spawn.Process(target=produce, args=(server.bootstrap, topic, rate, seconds, acks_out))
            cpu0, started = cpu_reading(server.proc.pid), time.monotonic()
            writer.start()
            writer.join()
            broker_cpu = cpu_reading(server.proc.pid).since(cpu0) / (time.monotonic() - started)
        finally:
            for reader in readers:
                reader.join(seconds + 60)
                if reader.is_alive():
                    reader.kill()
        latencies = sorted(v for out in outs for v in json.loads(Path(out).read_text()))
        acks = sorted(json.loads(Path(acks_out).read_text()))
    return {
        "consumers": consumers, "fetch_max_wait_ms": wait_ms, "rate": rate, "sent": len(acks),
        "received": len(latencies), "e2e_ms": {"p50": ms(latencies, 0.5), "p99": ms(latencies, 0.99),
                                               "p99.9": ms(latencies, 0.999), "max": ms(latencies, 1.0)},
        "produce_ack_ms": {"p50": ms(acks, 0.5), "p99": ms(acks, 0.99)},
        "tansu_cpu_cores": round(broker_cpu, 2), "load_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=280.0, help="records/s (scenario 5: ~280)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--consumers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--fetch-max-wait-ms", type=int, nargs="+", default=[100, 25, 10])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-wait-") as workdir:
        for _ in range(args.runs):
            for wait_ms in args.fetch_max_wait_ms:
                for consumers in args.consumers:
                    result = one_run(consumers, wait_ms, args.rate, args.seconds, Path(workdir))
                    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
