"""Kafka benchmark: squadbus over ``kafka://`` against raw aiokafka doing the same work, same run.

Two measurements, each on fresh topics, 1 KiB messages:

* **throughput, publish -> consume**: ``count`` messages published
  concurrently (squadbus: ``PUBLISHERS`` concurrent publisher tasks
  each awaiting one ``Bus.send`` after the other, each send returning after the broker's ack; raw: ``send()``
  for every record, awaiting the acks every ``RAW_WINDOW`` records, then
  ``flush()``), consumed by one consumer
  group (squadbus: a subscription with the default options, each delivery
  acked and its offset committed; raw: ``getmany`` + ``commit()`` per batch).
  Time runs from the first publish to the last message consumed (each
  line's notes say when the last publish was acknowledged: the producing
  side's share). Each side runs ``ROUNDS`` times, interleaved (every other
  round in reverse order), on fresh topics; the round with the median
  throughput is reported (the machine is shared and noisy).
* **end-to-end latency, open loop** at ``rate`` msgs/s for
  ``min(count, 5 * rate)`` messages: each message carries the time it was
  due (:mod:`squadbus.benchmarks.openloop`), the consumer records
  ``now - due``.

Both sides use the same producer settings (``acks="all"``, no linger, same
batch size) and the same consumer fetch settings.

Two raw publishing lines, one per squadbus configuration doing the same work:
with ``inboxes`` on (the default) squadbus writes two records per direct
message, the main-topic record keyed by the execution id and the inbox-topic
copy keyed by the recipient, so :func:`raw_throughput` with ``inbox_copy``
writes those two records too (the group still consumes only the main topic);
with ``inboxes=off`` squadbus writes one record, as the plain raw line does.
Every throughput line notes the process CPU per message (the client: its
producer and its consumer) and, given ``broker_pid``, the broker's.

``run`` is that fixed suite (``squadbus bench --suite``, ``bench/bench_kafka.py``);
``TARGET`` is what ``squadbus bench`` loads on kafka:// (:mod:`.loadgen`, raw side :class:`RawSide`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from squadbus.backends.kafka import Idempotence, KafkaBackend, KafkaSettings
from squadbus.benchmarks import loadgen
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result, abba, median_of, paired_ratio
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.core.tasks import wait_ended

PUBLISHERS = 200
RAW_WINDOW = 2000
ROUNDS = 3
PAYLOAD = "x" * 1024
BATCH = ConsumerOptions().batch_size
OPEN_LOOP_SECONDS = 5
RAW_STOP_SECONDS = 5.0  # at most this long for the raw side's consumer to finish its batch (getmany waits 200 ms)


@dataclass(slots=True)
class CpuResult(Result):
    """A throughput line with the CPU time spent per message over its run, in µs (None: not measured)."""

    client_us: float | None = None
    """This process (producer and consumer) per message."""
    broker_us: float | None = None
    """The broker's process per message (utime + stime, 10 ms ticks: coarse for short rounds)."""


class _Cpu:
    """CPU time of this process and of the broker (``broker_pid``, read from ``/proc``) from now on."""

    def __init__(self, broker_pid: int | None) -> None:
        self._pid = broker_pid
        self._client, self._broker = time.process_time(), self._broker_seconds()

    def _broker_seconds(self) -> float | None:
        if self._pid is None:
            return None
        try:
            with open(f"/proc/{self._pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def per_message(self, count: int) -> tuple[float, float | None]:
        """(client µs, broker µs or None) per message since construction."""
        client = (time.process_time() - self._client) * 1e6 / count
        now = self._broker_seconds()
        broker = None if now is None or self._broker is None else (now - self._broker) * 1e6 / count
        return client, broker


def _line(name: str, count: int, elapsed: float, notes: str, cpu: tuple[float, float | None]) -> CpuResult:
    client, broker = cpu
    used = f"CPU/msg client {client:.1f} µs" + (f", broker {broker:.1f} µs" if broker is not None else "")
    return CpuResult(name, count, elapsed, notes=f"{notes}; {used}", client_us=client, broker_us=broker)


def _settings(url: str, topic: str) -> KafkaSettings:
    """The settings of ``url`` with fresh topics (a later ``topic=`` wins)."""
    return KafkaSettings.from_url(f"{url}{'&' if '?' in url else '?'}topic={topic}")


async def _tuned(settings: KafkaSettings) -> KafkaSettings:
    """``settings`` as squadbus's backend runs them on the broker it meets (on tansu: the group timeouts and the
    fetch wait of ``KafkaSettings.for_broker``), so the raw client does the same work with the same waits."""
    backend = KafkaBackend(replace(settings, create_topics=False, idempotence=Idempotence.OFF))
    await backend.connect()
    try:
        tuned = backend.settings
    finally:
        await backend.close()
    return replace(settings, session_timeout_ms=tuned.session_timeout_ms,
                   heartbeat_interval_ms=tuned.heartbeat_interval_ms, fetch_max_wait_ms=tuned.fetch_max_wait_ms)


async def _until(check: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.perf_counter() + limit
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"benchmark timed out waiting for {what}")
        await asyncio.sleep(0.002)


# ---- squadbus ------------------------------------------------------------------------------------


async def _squadbus_bus(url: str, tag: str) -> Bus:
    settings = _settings(url, f"bench-sb-{tag}")
    return await Bus(KafkaBackend(settings)).start()


async def squadbus_throughput(
    url: str, count: int, *, batch: bool = False, note: str = "", broker_pid: int | None = None
) -> CpuResult:
    """squadbus: ``count`` concurrent sends consumed by one group.

    With ``batch``: ``Bus.publish_many`` in chunks of ``RAW_WINDOW``, the raw side's pattern.
    ``note`` goes into the line's name (what differs in ``url``).
    """
    tag = uuid.uuid4().hex[:8]
    agent = f"bench-{tag}"
    async with await _squadbus_bus(url, tag) as bus:
        received = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal received
            received += 1

        await bus.subscribe(subjects.direct(agent), handler, group=f"bench-{tag}")
        await bus.send("bench", agent, "warm-up")
        await _until(lambda: received >= 1, 60, "the squadbus group to join")
        received = 0
        left = count

        async def publisher() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await bus.send("bench", agent, PAYLOAD, task_execution_id=uuid.uuid4())

        cpu = _Cpu(broker_pid)
        start = time.perf_counter()
        if batch:
            subject = subjects.direct(agent)
            for first in range(0, count, RAW_WINDOW):
                await bus.publish_many([
                    envelope.build(subject=subject, sender_id="bench", recipient_id=agent, content=PAYLOAD,
                                   task_execution_id=uuid.uuid4())
                    for _ in range(min(RAW_WINDOW, count - first))
                ])
        else:
            await asyncio.gather(*(publisher() for _ in range(min(PUBLISHERS, count))))
        published = time.perf_counter() - start
        await _until(lambda: received >= count, 120, "squadbus to consume everything")
        elapsed = time.perf_counter() - start
        used = cpu.per_message(count)
    name = "squadbus kafka publish_many->consume" if batch else "squadbus kafka publish->consume"
    name = f"{name} ({note})" if note else name
    return _line(name, count, elapsed, f"acks=all, commit after ack; {_published(published, elapsed)}", used)


async def squadbus_latency(url: str, count: int, rate: float) -> Result:
    """squadbus: open loop at ``rate``; latency from due time to the handler."""
    tag = uuid.uuid4().hex[:8]
    agent = f"bench-{tag}"
    latencies: list[float] = []
    async with await _squadbus_bus(url, tag) as bus:
        warm = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            due = delivery.message.metadata.get("due")
            if due is None:
                warm.set()
                return
            latencies.append((time.perf_counter() - due) * 1000)

        await bus.subscribe(subjects.direct(agent), handler, group=f"bench-{tag}")
        await bus.send("bench", agent, "warm-up")
        await asyncio.wait_for(warm.wait(), 60)

        async def send(i: int, due: float) -> None:
            await bus.send("bench", agent, PAYLOAD, task_execution_id=uuid.uuid4(), metadata={"due": due})

        elapsed = await drive(rate, count, send)
        await _until(lambda: len(latencies) >= count, 60, "squadbus latency messages")
    return Result(f"squadbus kafka e2e @{rate:g}/s open loop", count, elapsed, latencies, notes="")


def _published(published: float, elapsed: float) -> str:
    """When the last publish returned, beside the end: which side (producing or consuming) the time went to."""
    return f"all acked at {published:.2f} s of {elapsed:.2f} s"


# ---- raw aiokafka --------------------------------------------------------------------------------


async def _raw_topic(settings: KafkaSettings, tag: str, *more: str) -> str:
    """Create ``bench-raw-<tag>`` (and ``bench-raw-<tag><suffix>`` for each of ``more``); returns the first."""
    topic = f"bench-raw-{tag}"
    admin = AIOKafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, settings.partitions, settings.replication_factor)
                                   for name in (topic, *(f"{topic}{suffix}" for suffix in more))])
    finally:
        await admin.close()
    return topic


def _raw_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=list(settings.bootstrap_servers), acks="all", linger_ms=0,
        enable_idempotence=False, max_batch_size=settings.max_batch_bytes,
    )


def _raw_consumer(settings: KafkaSettings, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic, bootstrap_servers=list(settings.bootstrap_servers), group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms, fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_poll_records=BATCH,
    )


def _value() -> bytes:
    # The same bytes squadbus puts on the wire for a 1 KiB message.
    return envelope.encode(envelope.build(subject="agent.message.bench", sender_id="bench", content=PAYLOAD))


async def _consume(consumer: AIOKafkaConsumer, on_record: Callable[[bytes], None], done: Callable[[], bool]) -> None:
    while not done():
        batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
        for records in batch.values():
            for record in records:
                on_record(record.value)
        if batch:
            await consumer.commit()


async def raw_throughput(
    url: str, count: int, *, awaited: bool = False, inbox_copy: bool = False, broker_pid: int | None = None
) -> CpuResult:
    """Raw aiokafka: ``send()`` everything, ``flush()``, one group with getmany + commit.

    With ``awaited``, ``PUBLISHERS`` tasks each await every record's ack
    instead, the publishing pattern of ``Bus.send`` (for context). With
    ``inbox_copy``, the work squadbus does with inboxes on: each message is
    two records, one in the consumed topic keyed by its execution id and one
    in a second topic keyed by the recipient (the same key for every message,
    as every message goes to one agent); the window counts messages.
    """
    settings = await _tuned(KafkaSettings.from_url(url))
    tag = uuid.uuid4().hex[:8]
    topic = await _raw_topic(settings, tag, *((".inbox",) if inbox_copy else ()))
    inbox, recipient = f"{topic}.inbox", f"bench-{tag}".encode()
    producer = _raw_producer(settings)
    consumer = _raw_consumer(settings, topic, f"bench-raw-{tag}")
    await producer.start()
    await consumer.start()
    received = 0

    def count_one(_: bytes) -> None:
        nonlocal received
        received += 1

    consuming = asyncio.create_task(_consume(consumer, count_one, lambda: received >= count + 1))
    try:
        await producer.send_and_wait(topic, b"warm-up", key=b"warm-up")
        await _until(lambda: received >= 1, 60, "the raw group to join")
        received = 1
        value = _value()
        cpu = _Cpu(broker_pid)
        start = time.perf_counter()
        if awaited:
            left = count

            async def publisher() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await (await producer.send(topic, value, key=str(uuid.uuid4()).encode()))

            await asyncio.gather(*(publisher() for _ in range(min(PUBLISHERS, count))))
        else:
            pending = []
            window = RAW_WINDOW * 2 if inbox_copy else RAW_WINDOW
            for _ in range(count):
                pending.append(await producer.send(topic, value, key=str(uuid.uuid4()).encode()))
                if inbox_copy:
                    pending.append(await producer.send(inbox, value, key=recipient))
                if len(pending) >= window:
                    await asyncio.gather(*pending)
                    pending.clear()
            await producer.flush()
            await asyncio.gather(*pending)
        published = time.perf_counter() - start
        await _until(lambda: received >= count + 1, 120, "raw aiokafka to consume everything")
        elapsed = time.perf_counter() - start
        used = cpu.per_message(count)
        await consuming
    finally:
        consuming.cancel()
        await consumer.stop()
        await producer.stop()
    if awaited:
        return _line("raw aiokafka awaited sends, getmany+commit", count, elapsed,
                     f"context only; {_published(published, elapsed)}", used)
    if inbox_copy:
        return _line("raw aiokafka 2 records/msg (main + inbox copy), getmany+commit", count, elapsed,
                     f"the records squadbus writes with inboxes on; {_published(published, elapsed)}", used)
    return _line("raw aiokafka send()+flush, getmany+commit", count, elapsed,
                 f"same producer settings; {_published(published, elapsed)}", used)


async def raw_latency(url: str, count: int, rate: float) -> Result:
    """Raw aiokafka: open loop at ``rate``; the record value carries its index."""
    settings = await _tuned(KafkaSettings.from_url(url))
    tag = uuid.uuid4().hex[:8]
    topic = await _raw_topic(settings, tag)
    producer = _raw_producer(settings)
    consumer = _raw_consumer(settings, topic, f"bench-raw-{tag}")
    await producer.start()
    await consumer.start()
    dues: dict[int, float] = {}
    latencies: list[float] = []
    warm = asyncio.Event()
    padding = b"x" * (len(_value()) - 8)

    def on_record(value: bytes) -> None:
        if value == b"warm-up":
            warm.set()
            return
        index = struct.unpack_from(">q", value)[0]
        latencies.append((time.perf_counter() - dues[index]) * 1000)

    consuming = asyncio.create_task(_consume(consumer, on_record, lambda: len(latencies) >= count))
    try:
        await producer.send_and_wait(topic, b"warm-up", key=b"warm-up")
        await asyncio.wait_for(warm.wait(), 60)

        async def send(i: int, due: float) -> None:
            dues[i] = due
            await (await producer.send(topic, struct.pack(">q", i) + padding, key=str(uuid.uuid4()).encode()))

        elapsed = await drive(rate, count, send)
        await _until(lambda: len(latencies) >= count, 60, "raw latency messages")
        await consuming
    finally:
        consuming.cancel()
        await consumer.stop()
        await producer.stop()
    return Result(f"raw aiokafka e2e @{rate:g}/s open loop", count, elapsed, latencies)


async def run(
    *, url: str, count: int, rate: float, broker_pid: int | None = None, rounds_run: int = ROUNDS
) -> list[Result]:
    """squadbus vs raw aiokafka against the broker at ``url`` (a ``kafka://`` URL).

    Returns, in order: raw throughput (one record per message), squadbus
    throughput, raw latency, squadbus latency (see the module docstring), for
    context raw aiokafka throughput with per-record awaited sends (Bus.send's
    pattern), squadbus throughput with ``Bus.publish_many`` (the raw side's
    pattern), the same with ``inboxes=off`` (one record per message, as the
    first raw line), and raw aiokafka writing the two records squadbus writes
    with inboxes on (the default). So like with like: ``publish_many`` over
    the last raw line, and ``publish_many`` with ``inboxes=off`` over the
    first; those two squadbus lines carry the median of their per-round
    ratios (``Result.ratio``). ``broker_pid`` (the broker runs on this
    machine): its CPU per message is noted too. ``rounds_run`` rounds of the
    throughput lines.
    """
    latency_count = max(1, min(count, int(rate * OPEN_LOOP_SECONDS)))
    single = f"{url}{'&' if '?' in url else '?'}inboxes=off"
    pid = broker_pid
    lines: list[Callable[[], Awaitable[Result]]] = [
        lambda: raw_throughput(url, count, broker_pid=pid),
        lambda: squadbus_throughput(url, count, broker_pid=pid),
        lambda: raw_throughput(url, count, awaited=True, broker_pid=pid),
        lambda: squadbus_throughput(url, count, batch=True, broker_pid=pid),
        lambda: squadbus_throughput(single, count, batch=True, note="inboxes=off: one record per message",
                                    broker_pid=pid),
        lambda: raw_throughput(url, count, inbox_copy=True, broker_pid=pid),
    ]
    # Run so that each compared pair is adjacent (raw 1 record beside inboxes=off, raw 2 records beside
    # inboxes on), and every other round in reverse: tansu keeps everything in memory and slows as it
    # fills, which would favour whichever line always ran first.
    order = [0, 4, 1, 2, 3, 5]
    rounds: list[list[Result]] = [[] for _ in lines]
    for number in range(rounds_run):
        for index in order if number % 2 == 0 else reversed(order):
            rounds[index].append(await lines[index]())
    raw, ours, awaited, many, many_single, raw_two = (median_of(out) for out in rounds)
    # Each round's ratio cancels the machine's drift between rounds, which a ratio of medians does not.
    for line, ours_rounds, raw_rounds in ((many, rounds[3], rounds[5]), (many_single, rounds[4], rounds[0])):
        line.ratio, each = paired_ratio(ours_rounds, raw_rounds)
        line.notes += f"; per-round ratios to its raw line {', '.join(f'{r:.2f}' for r in each)}"
    # The latency runs as raw, squadbus, squadbus, raw (half the count each), for the same reason.
    half = max(1, latency_count // 2)
    raw_lat, our_lat = await abba(lambda: raw_latency(url, half, rate), lambda: squadbus_latency(url, half, rate))
    return [raw, ours, raw_lat, our_lat, awaited, many, many_single, raw_two]


# ---- squadbus bench: the raw side on kafka:// ------------------------------------------------------


class RawSide:
    """The raw side of ``squadbus bench`` on Kafka: each sender awaits one record's ack (``acks="all"``,
    no linger, the backend's batch size), one group consumer runs ``getmany`` + ``commit()`` per batch
    with the session and fetch settings squadbus runs on the broker (:func:`_tuned`)."""

    def __init__(self, url: str, size: int, tag: str) -> None:
        import aiokafka

        self.name = f"aiokafka {aiokafka.__version__}: send awaited -> getmany + commit"
        self.settings = KafkaSettings.from_url(url)
        self.tag = tag
        self.topic = ""
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._value = envelope.encode(envelope.build(subject="agent.message.bench", sender_id="bench",
                                                     content="x" * (size - loadgen.INDEX_DIGITS)))

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        self.settings = await _tuned(self.settings)  # not timed: squadbus's probe, not the raw client's work
        t0 = time.perf_counter()
        self.topic = await _raw_topic(self.settings, self.tag)
        producer = self._producer = _raw_producer(self.settings)
        consumer = self._consumer = _raw_consumer(self.settings, self.topic, f"bench-raw-{self.tag}")
        await producer.start()
        connected = time.perf_counter()
        await consumer.start()
        subscribed = time.perf_counter()

        async def consume() -> None:
            while not self._stopping:
                batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
                for records in batch.values():
                    for record in records:
                        if record.value is not None:
                            deliver(loadgen.index_of(record.value))
                if batch:
                    await consumer.commit()

        self._task = asyncio.create_task(consume())
        return {"connect_s": connected - t0, "subscribe_s": subscribed - connected}

    async def publish(self, index: int) -> None:
        assert self._producer is not None
        value = loadgen.stamp(index).encode() + self._value
        await (await self._producer.send(self.topic, value, key=str(uuid.uuid4()).encode()))

    async def stop(self) -> None:
        # The consumer ends between two batches: cancelled in commit(), aiokafka's shielded commit went on and
        # failed once the client stopped ("Task exception was never retrieved" in 1 stop of 6 to 15 runs).
        self._stopping = True
        task, self._task = self._task, None
        with contextlib.suppress(Exception):  # a timeout (then it is cancelled), or the task's own failure
            await asyncio.wait_for(wait_ended(task), RAW_STOP_SECONDS)
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._consumer = self._producer = None
        if self.topic:
            await _delete_topics(self.settings, [self.topic])
            self.topic = ""


async def _delete_topics(settings: KafkaSettings, topics: list[str]) -> None:
    """Best effort: a broker that refuses keeps them (tansu's memory storage forgets them on restart)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
    with contextlib.suppress(Exception):
        await admin.start()
        await admin.delete_topics(topics)
    with contextlib.suppress(Exception):
        await admin.close()


def _bench_url(url: str, tag: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}topic=bench-sb-{tag}"


async def _broker(url: str) -> loadgen.Broker:
    """The broker's API versions (the Kafka protocol carries no version string) and the acks settings."""
    from aiokafka.conn import create_conn

    settings = KafkaSettings.from_url(url)
    host, _, port = settings.bootstrap_servers[0].rpartition(":")
    conn = await asyncio.wait_for(create_conn(host, int(port)), settings.connect_timeout)
    try:
        versions: dict[int, tuple[int, int]] = dict(conn._versions)  # ApiVersions, read by aiokafka at connect
    finally:
        conn.close()
    produce, fetch = versions.get(0, (0, 0)), versions.get(1, (0, 0))
    version = (f"Kafka protocol ({len(versions)} APIs, Produce v{produce[0]}-{produce[1]}, "
               f"Fetch v{fetch[0]}-{fetch[1]}; no version string in the protocol)")
    durability = (f"acks=all, replication_factor={settings.replication_factor} (URL), "
                  f"idempotence={settings.idempotence.value}; what survives a crash is the broker's storage")
    return loadgen.Broker("kafka", version, durability)


async def _drop(url: str, tag: str, subs: list[Subscription]) -> None:
    s = _settings(url, f"bench-sb-{tag}")
    await _delete_topics(s, [s.topic, s.reply_topic, s.dlq_topic])


TARGET = loadgen.Target(squadbus_url=_bench_url, raw=RawSide, broker=_broker, cleanup=_drop)
"""How ``squadbus bench`` runs on kafka:// (every run on topics of its own)."""
