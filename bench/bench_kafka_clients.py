"""aiokafka against confluent-kafka (librdkafka, its asyncio wrappers), the same work in one run (issue 19, item 3).

    python bench/bench_kafka_clients.py [--count 50000] [--size 1024] [--runs 3]

Needs the ``bench`` extra (``pip install -e .[bench]`` with the lock as constraint:
it pins confluent-kafka). Starts a private tansu broker (memory storage) per run.
For each client, on a fresh topic of 8 partitions:

* **produce**: ``count`` records of ``size`` bytes keyed by 100 execution ids,
  ``acks=all``, every delivery awaited (futures gathered per 1,000 records),
  with and without two headers (squadbus puts its subject and id in headers;
  confluent-kafka's ``AIOProducer`` refuses headers in its batch mode, so that
  line uses the synchronous ``Producer.produce`` with a poll thread instead);
* **consume**: the same records read by one group member with a commit after
  every batch of up to 500 (``getmany`` + ``commit`` / ``consume`` + ``commit``),
  timed from the first record; the time from ``subscribe`` to the first record
  (the group join) is printed on its own line.

Throughput, and client CPU per record (process time: librdkafka's threads are
counted), over ``runs`` runs, worst beside best.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from squadbus.testing.servers.kafka import TansuServer

PARTITIONS = 8
# squadbus's defaults for both clients (librdkafka's own session timeout, 45 s, made its first join on
# tansu take 23 s: tansu completes a new group's first join after about half the session timeout).
SESSION_MS, HEARTBEAT_MS = 10_000, 3_000
WINDOW = 1000
HEADERS: list[tuple[str, str | bytes | None]] = [
    ("squadbus-subject", b"agent.message.dev-1"), ("squadbus-id", b"0c7c6b7e-3f59-4a47-8c3a-1e2f9c1d9b7a"),
]


def records(count: int, size: int) -> list[tuple[bytes, bytes]]:
    keys = [uuid.uuid4().bytes for _ in range(100)]
    value = b"x" * size
    return [(keys[i % 100], value) for i in range(count)]


async def create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()


async def measured(work: Awaitable[float | None], count: int) -> tuple[float, float, float | None]:
    """(records/s, CPU µs/record, join s) of ``work`` (not started yet); ``work`` may return the wall time
    it really started at (a consumer's first record), which then starts the throughput clock."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    started = await work
    wall, cpu = time.perf_counter() - (started or wall0), time.process_time() - cpu0
    return count / wall, cpu / count * 1e6, (started - wall0) if started else None


async def aiokafka_produce(bootstrap: str, topic: str, data: list[tuple[bytes, bytes]], headers: bool) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    try:
        for i in range(0, len(data), WINDOW):
            futures = [await producer.send(topic, v, key=k, headers=HEADERS if headers else None)
                       for k, v in data[i:i + WINDOW]]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def confluent_produce(bootstrap: str, topic: str, data: list[tuple[bytes, bytes]], headers: bool) -> None:
    conf = {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "enable.idempotence": False}
    if not headers:
        from confluent_kafka.aio import AIOProducer

        producer = AIOProducer(conf, batch_size=WINDOW, buffer_timeout=0.005)
        try:
            for i in range(0, len(data), WINDOW):
                futures = [await producer.produce(topic, value=v, key=k) for k, v in data[i:i + WINDOW]]
                await producer.flush()
                await asyncio.gather(*futures)
        finally:
            await producer.close()
        return
    # Headers: the synchronous Producer, delivery reports polled by a thread into the loop's futures.
    from confluent_kafka import KafkaException, Producer

    loop = asyncio.get_running_loop()
    sync = Producer(conf)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            sync.poll(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        for i in range(0, len(data), WINDOW):
            futures = []
            for k, v in data[i:i + WINDOW]:
                future: asyncio.Future[None] = loop.create_future()

                def done(err: object, _msg: object, future: asyncio.Future[None] = future) -> None:
                    if err is None:
                        loop.call_soon_threadsafe(future.set_result, None)
                    else:
                        loop.call_soon_threadsafe(future.set_exception, KafkaException(err))

                sync.produce(topic, value=v, key=k, headers=HEADERS, on_delivery=done)
                futures.append(future)
            await asyncio.gather(*futures)
    finally:
        stop.set()
        poller.join()
        sync.flush(5)


async def aiokafka_consume(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500,
                                session_timeout_ms=SESSION_MS, heartbeat_interval_ms=HEARTBEAT_MS)
    await consumer.start()
    first_at, seen = 0.0, 0
    try:
        while seen < count:
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            got = sum(len(b) for b in batches.values())
            if got and not first_at:
                first_at = time.perf_counter()
            seen += got
            if got:
                await consumer.commit()
    finally:
        await consumer.stop()
    return first_at


async def confluent_consume(bootstrap: str, topic: str, count: int) -> float:
    from confluent_kafka.aio import AIOConsumer

    consumer = AIOConsumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}",
                            "enable.auto.commit": False, "auto.offset.reset": "earliest",
                            "session.timeout.ms": SESSION_MS, "heartbeat.interval.ms": HEARTBEAT_MS}, max_workers=2)
    await consumer.subscribe([topic])
    first_at, seen = 0.0, 0
    try:
        while seen < count:
            msgs = await consumer.consume(num_messages=500, timeout=0.5)
            got = sum(1 for m in msgs if m.error() is None)
            if got and not first_at:
                first_at = time.perf_counter()
            seen += got
            if got:
                await consumer.commit(asynchronous=False)
    finally:
        await consumer.close()
    return first_at


async def one_run(count: int, size: int) -> dict[str, float]:
    data = records(count, size)
    out: dict[str, float] = {}
    with TansuServer() as server:
        boot = server.bootstrap
        for client, produce, consume in (("aiokafka", aiokafka_produce, aiokafka_consume),
                                         ("confluent", confluent_produce, confluent_consume)):
            topic = f"bench-{client}-{uuid.uuid4().hex[:6]}"
            await create_topic(boot, topic)
            for headers in (False, True):
                rate, cpu, _ = await measured(_none(produce(boot, topic, data, headers)), count)
                tag = "produce+headers" if headers else "produce"
                out[f"{client} {tag} rec/s"], out[f"{client} {tag} cpu us/rec"] = rate, cpu
            total = 2 * count
            rate, cpu, join = await measured(consume(boot, topic, total), total)
            out[f"{client} consume+commit rec/s"], out[f"{client} consume cpu us/rec"] = rate, cpu
            out[f"{client} subscribe->first record s"] = join or float("nan")
    return out


async def _none(work: Awaitable[None]) -> None:
    await work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = [asyncio.run(one_run(args.count, args.size)) for _ in range(args.runs)]
    out = sys.stdout
    out.write(f"tansu (memory storage), {args.count:,} records of {args.size} B, {PARTITIONS} partitions, "
              f"{args.runs} runs: worst .. best (median)\n")
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        median = statistics.median(values)
        out.write(f"  {key:38s} {values[0]:>10,.1f} .. {values[-1]:>10,.1f} ({median:,.1f})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
