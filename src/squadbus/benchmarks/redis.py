"""squadbus on Redis vs raw redis-py doing the same work, in the same run, 1 KiB messages.

Throughput: ``count`` messages published and consumed by one consumer group.
The raw baseline pipelines ``XADD`` in chunks of 500 and consumes with
``XREADGROUP COUNT 500`` + one ``XACK`` per batch; squadbus sends the same
chunks as concurrent ``Bus.send`` calls (auto-batched) or one
``Bus.publish_many`` per chunk, into a group subscription with a handler per
message or (the raw side's pattern at both ends) ``Bus.subscribe_batch``. All
count from the first send to the last message consumed; each line shows its
median of ``ROUNDS`` interleaved rounds, and each ratio is the median of the
per-round ratios (rounds seconds apart cancel the shared machine's drift).

Latency: an open loop at ``rate`` msgs/s (``openloop.drive``), latency from the
intended send time to the handler, p50/p99/p99.9, raw ``XADD`` + blocking
``XREADGROUP`` beside squadbus at the same rate.

``run`` is that fixed suite (``squadbus bench --suite``, ``bench/bench_redis.py``);
``TARGET`` is what ``squadbus bench`` loads on redis:// (:mod:`.loadgen`, raw side :class:`RawSide`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from squadbus.backends.redis import RedisSettings
from squadbus.backends.redis._driver import call, queue
from squadbus.benchmarks import loadgen
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result, interleaved_rounds, median_of, paired_ratio, ratio
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription
from squadbus.core.bus import Bus
from squadbus.core.tasks import cancel_and_wait

CONTENT = "x" * 1024
CHUNK = 500
LATENCY_SECONDS = 5.0
ROUNDS = 7
_READ = ("XREADGROUP", "GROUP", "g", "c", "COUNT", CHUNK, "BLOCK", 1000, "STREAMS")


def _with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


RAW_CONNECTIONS = 64
"""The raw client's pool: sends beyond it wait for a connection, as a redis-py user would configure it
(redis-py 8's default pool refuses the 101st concurrent command with MaxConnectionsError, which an
open-loop run behind schedule reaches: thousands of sends in flight at once)."""


def _raw_client(url: str) -> aioredis.Redis:
    s = RedisSettings.from_url(url)
    kind: type[aioredis.Connection] = aioredis.SSLConnection if s.tls else aioredis.Connection
    pool = aioredis.BlockingConnectionPool(
        connection_class=kind, max_connections=RAW_CONNECTIONS, timeout=None, host=s.host, port=s.port, db=s.db,
        username=s.username, password=s.password, socket_timeout=None,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def _payload() -> bytes:
    return envelope.encode(envelope.build(subject=subjects.direct("bench"), sender_id="pm", content=CONTENT))


async def _raw_consume(client: aioredis.Redis, key: str, count: int, *, decode: bool = False) -> None:
    """The raw lines' consumer: ``XREADGROUP COUNT 500`` and one ``XACK`` per batch until ``count``
    entries came (each decoded as an envelope with ``decode``)."""
    done = 0
    while done < count:
        reply = await call(client, *_READ, key, ">")
        for _, entries in reply or ():
            if decode:
                for _, fields in entries:
                    envelope.decode(fields[b"m"])
            ids = [entry_id for entry_id, _ in entries]
            done += len(ids)
            await call(client, "XACK", key, "g", *ids)


async def raw_throughput(url: str, count: int, *, envelopes: bool = False) -> Result:
    """Pipelined XADD + XREADGROUP/XACK with redis-py, nothing else.

    With ``envelopes`` each message is also built, encoded and decoded with
    squadbus's envelope codec, to show how much of the gap is the envelope.
    """
    client = _raw_client(url)
    key, payload = f"bench-raw-{secrets.token_hex(4)}", _payload()
    subject = subjects.direct("bench")
    try:
        await call(client, "XGROUP", "CREATE", key, "g", "$", "MKSTREAM")
        start = time.perf_counter()
        consumer = asyncio.create_task(_raw_consume(client, key, count, decode=envelopes))
        for first in range(0, count, CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for _ in range(min(CHUNK, count - first)):
                    if envelopes:
                        payload = envelope.encode(envelope.build(subject=subject, sender_id="pm", content=CONTENT))
                    queue(pipe, "XADD", key, "*", "m", payload)
                await pipe.execute()
        await consumer
        name = "redis-py raw + envelope build/encode/decode" if envelopes else \
            "redis-py raw: pipelined XADD + XREADGROUP/XACK"
        return Result(name, count, time.perf_counter() - start)
    finally:
        await client.delete(key)
        await client.aclose()


async def raw_concurrent_throughput(url: str, count: int) -> Result:
    """Concurrent senders on redis-py, auto-pipelined by hand: the raw client doing what concurrent
    ``Bus.send`` does.

    Each message is a task (``gather`` of a chunk, as the squadbus line) that queues its ``XADD`` and
    awaits a future; one flusher sends what is queued as one pipeline and resolves the futures, then
    the next (ioredis' auto-pipelining). The consumer is the raw line's ``XREADGROUP``/``XACK``.
    """
    client = _raw_client(url)
    key, payload = f"bench-rawc-{secrets.token_hex(4)}", _payload()
    loop = asyncio.get_running_loop()
    queued: list[asyncio.Future[None]] = []
    flusher: asyncio.Task[None] | None = None

    async def flush() -> None:
        while queued:
            batch = queued[:]
            del queued[:]
            async with client.pipeline(transaction=False) as pipe:
                for _ in batch:
                    queue(pipe, "XADD", key, "*", "m", payload)
                await pipe.execute()
            for future in batch:
                future.set_result(None)

    async def send() -> None:
        nonlocal flusher
        future = loop.create_future()
        queued.append(future)
        if flusher is None or flusher.done():
            flusher = asyncio.create_task(flush())
        await future

    try:
        await call(client, "XGROUP", "CREATE", key, "g", "$", "MKSTREAM")
        start = time.perf_counter()
        consumer = asyncio.create_task(_raw_consume(client, key, count))
        for first in range(0, count, CHUNK):
            await asyncio.gather(*(send() for _ in range(min(CHUNK, count - first))))
        await consumer
        return Result("redis-py raw: concurrent senders auto-pipelined -> XREADGROUP/XACK", count,
                      time.perf_counter() - start)
    finally:
        await client.delete(key)
        await client.aclose()


async def squadbus_throughput(url: str, count: int, *, batch: bool = False, batch_handler: bool = False) -> Result:
    """Concurrent Bus.send (auto-batched) into a group subscription.

    With ``batch``, each chunk goes through ``Bus.publish_many`` instead: the
    same pattern as the raw pipeline (one call per chunk, no task per message).
    With ``batch_handler`` too, the group hands over batches of up to a chunk
    (``Bus.subscribe_batch``, one XACK write per batch), as the raw consumer.
    """
    prefix = f"bench-{secrets.token_hex(4)}"
    agent = "bench-agent"
    async with Bus.from_url(_with_prefix(url, prefix)) as bus:
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        async def batch_of(deliveries: Sequence[Delivery]) -> None:
            nonlocal seen
            seen += len(deliveries)
            if seen >= count:
                done.set()

        options = ConsumerOptions(batch_size=CHUNK, start=StartFrom.NEW)
        if batch_handler:
            await bus.subscribe_batch(subjects.direct(agent), batch_of, group="bench", max_batch=CHUNK, options=options)
        else:
            await bus.subscribe(subjects.direct(agent), handler, group="bench", options=options)
        start = time.perf_counter()
        subject = subjects.direct(agent)
        for first in range(0, count, CHUNK):
            size = min(CHUNK, count - first)
            if batch:
                await bus.publish_many([
                    envelope.build(subject=subject, sender_id="pm", recipient_id=agent, content=CONTENT)
                    for _ in range(size)
                ])
            else:
                await asyncio.gather(*(bus.send("pm", agent, CONTENT) for _ in range(size)))
        await done.wait()
        elapsed = time.perf_counter() - start
    await _drop_prefix(url, prefix)
    sender = "publish_many" if batch else "Bus.send"
    receiver = "batch handler" if batch_handler else "group handler"
    return Result(f"squadbus redis: {sender} -> {receiver}", count, elapsed)


async def raw_latency(url: str, count: int, rate: float) -> Result:
    """Open-loop XADD at ``rate``; a blocking XREADGROUP consumer measures from the due time."""
    client = _raw_client(url)
    key, payload = f"bench-rawlat-{secrets.token_hex(4)}", _payload()
    latencies: list[float] = []
    try:
        await call(client, "XGROUP", "CREATE", key, "g", "$", "MKSTREAM")

        async def consume() -> None:
            while len(latencies) < count:
                reply = await call(client, *_READ, key, ">")
                for _, entries in reply or ():
                    now = time.perf_counter()
                    latencies.extend((now - float(fields[b"t"])) * 1000 for _, fields in entries)
                    await call(client, "XACK", key, "g", *(entry_id for entry_id, _ in entries))

        async def send(i: int, due: float) -> None:
            await call(client, "XADD", key, "*", "m", payload, "t", repr(due))

        consumer = asyncio.create_task(consume())
        try:
            elapsed = await drive(rate, count, send)
        except BaseException:
            consumer.cancel()
            raise
        await consumer
        return Result(f"redis-py raw: XADD/XREADGROUP @{rate:g}/s", count, elapsed, latencies)
    finally:
        await client.delete(key)
        await client.aclose()


async def squadbus_latency(url: str, count: int, rate: float) -> Result:
    """Open-loop Bus.send at ``rate``; the group handler measures from the due time."""
    prefix = f"bench-{secrets.token_hex(4)}"
    latencies: list[float] = []
    async with Bus.from_url(_with_prefix(url, prefix)) as bus:
        done = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            latencies.append((time.perf_counter() - float(delivery.message.headers["due"])) * 1000)
            if len(latencies) >= count:
                done.set()

        options = ConsumerOptions(start=StartFrom.NEW)
        await bus.subscribe(subjects.direct("lat"), handler, group="bench", options=options)

        async def send(i: int, due: float) -> None:
            await bus.send("pm", "lat", CONTENT, headers={"due": repr(due)}, task_execution_id=uuid.uuid4())

        elapsed = await drive(rate, count, send)
        await done.wait()
    await _drop_prefix(url, prefix)
    return Result(f"squadbus redis: send -> handler @{rate:g}/s", count, elapsed, latencies)


async def _drop_prefix(url: str, prefix: str) -> None:
    client = _raw_client(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for first in range(0, len(keys), 500):
            await client.delete(*keys[first:first + 500])
    finally:
        await client.aclose()


async def run(*, url: str, count: int, rate: float, rounds: int = ROUNDS) -> list[Result]:
    """Throughput (``count`` messages) and open-loop latency (``rate`` msgs/s for ~5 s) against ``url``.

    Returns, in order: raw throughput, squadbus throughput with concurrent
    sends, with ``publish_many`` and with ``publish_many`` into a batch
    handler, raw + envelope throughput (for reference), raw concurrent senders
    auto-pipelined (the concurrent sends' own pattern), raw latency, squadbus
    latency. The lines run interleaved, ``rounds`` times; each shows its
    median round, and each squadbus line's ``ratio`` is the median of its
    per-round ratios to the raw line of the same round (``stats.paired_ratio``).
    """
    raw, ours, many, batches, raw_env, raw_conc = await interleaved_rounds(
        rounds,
        lambda: raw_throughput(url, count),
        lambda: squadbus_throughput(url, count),
        lambda: squadbus_throughput(url, count, batch=True),
        lambda: squadbus_throughput(url, count, batch=True, batch_handler=True),
        lambda: raw_throughput(url, count, envelopes=True),
        lambda: raw_concurrent_throughput(url, count),
    )
    lines = [_compared(line, raw, "ratio vs raw") for line in (ours, many, batches)]
    envelope_line = median_of(raw_env)
    envelope_line.notes = f"squadbus publish_many / this = {_listed(many, raw_env)[1]}; {envelope_line.notes}"
    concurrent_line = median_of(raw_conc)
    concurrent_line.notes = f"squadbus Bus.send / this = {_listed(ours, raw_conc)[1]}; {concurrent_line.notes}"
    latency_count = max(100, min(count, int(rate * LATENCY_SECONDS)))
    raw_lat = await raw_latency(url, latency_count, rate)
    our_lat = await squadbus_latency(url, latency_count, rate)
    return [median_of(raw), *lines, envelope_line, concurrent_line, raw_lat, our_lat]


async def run_concurrent(*, url: str, count: int, rounds: int = ROUNDS) -> list[Result]:
    """Only the concurrent-send pair, interleaved ``rounds`` times: concurrent ``Bus.send`` -> group
    handler, then redis-py doing the same pattern (:func:`raw_concurrent_throughput`); the squadbus
    line's ``ratio`` is the median of its per-round ratios to the raw line."""
    ours, raw_conc = await interleaved_rounds(
        rounds, lambda: squadbus_throughput(url, count), lambda: raw_concurrent_throughput(url, count))
    return [_compared(ours, raw_conc, "ratio vs raw concurrent auto-pipelined (same pattern)"), median_of(raw_conc)]


def _compared(line: list[Result], baseline: list[Result], what: str) -> Result:
    """``line``'s median round, with ``ratio`` the median of its per-round ratios to ``baseline``."""
    chosen = median_of(line)
    chosen.ratio, listed = _listed(line, baseline)
    chosen.notes = f"{what} = {listed}; {chosen.notes}"
    return chosen


def _listed(line: list[Result], baseline: list[Result]) -> tuple[float, str]:
    """The median of the per-round ratios, and it with every round's ratio as text."""
    middle, ratios = paired_ratio(line, baseline)
    return middle, f"{middle:.2f} (median of rounds {', '.join(f'{r:.2f}' for r in ratios)})"


def summary(results: list[Result]) -> dict[str, Any]:
    """The headline numbers of a ``run`` for the JSON line, each the median of per-round ratios.

    ``throughput_ratio`` compares the same pattern on both sides, as in the other
    benchmarks: batches handed over whole (``publish_many`` / a pipeline) into a
    consumer group. ``concurrent_send_ratio`` sets concurrent ``Bus.send`` calls
    (a task and a future per message) against that same raw pipeline, and
    ``concurrent_send_same_pattern_ratio`` against redis-py doing the same
    (a task per message, auto-pipelined by hand: :func:`raw_concurrent_throughput`);
    ``raw_concurrent_vs_pipeline`` is what a task per message costs the raw client.
    """
    raw, ours, many, batches, _, concurrent = results[:6]
    return {
        "throughput_ratio": _rounded(many.ratio),
        "batch_handler_ratio": _rounded(batches.ratio),
        "concurrent_send_ratio": _rounded(ours.ratio),
        # These two from the lines' median rounds (the per-round ratios are in the lines' notes).
        "concurrent_send_same_pattern_ratio": _rounded(ratio(ours, concurrent)),
        "raw_concurrent_vs_pipeline": _rounded(ratio(concurrent, raw)),
        "target_ratio": 0.8,
    }


def _rounded(value: float | None) -> float:
    return round(value, 3) if value is not None else math.nan


# ---- squadbus bench: the raw side on redis:// ------------------------------------------------------


class RawSide:
    """The raw side of ``squadbus bench`` on Redis: each sender awaits one ``XADD`` (redis-py's pool
    gives concurrent senders connections of their own), one consumer reads ``XREADGROUP COUNT 500
    BLOCK 1000`` and acks each batch with one ``XACK``."""

    def __init__(self, url: str, size: int, tag: str) -> None:
        self.name = f"redis-py {_redis_py()}: XADD awaited -> XREADGROUP/XACK"
        self.url = url
        self.key = f"bench-raw-{tag}"
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        # the same bytes squadbus puts in the entry for this content, after the index
        self._payload = _payload_of(size - loadgen.INDEX_DIGITS)

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        t0 = time.perf_counter()
        client = self._client = _raw_client(self.url)
        reader = self._reader = _raw_client(self.url)
        await call(client, "PING")
        connected = time.perf_counter()
        await call(client, "XGROUP", "CREATE", self.key, "g", "$", "MKSTREAM")
        subscribed = time.perf_counter()

        async def consume() -> None:
            while True:
                reply = await call(reader, *_READ, self.key, ">")
                for _, entries in reply or ():
                    for _, fields in entries:
                        deliver(loadgen.index_of(fields[b"m"]))
                    await call(reader, "XACK", self.key, "g", *(entry_id for entry_id, _ in entries))

        self._task = asyncio.create_task(consume())
        return {"connect_s": connected - t0, "subscribe_s": subscribed - connected}

    async def publish(self, index: int) -> None:
        assert self._client is not None
        await call(self._client, "XADD", self.key, "*", "m", loadgen.stamp(index).encode() + self._payload)

    async def stop(self) -> None:
        task, self._task = self._task, None
        with contextlib.suppress(Exception):  # the consuming task's own failure is not the stop's
            await cancel_and_wait(task)
        for client in (self._client, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    if client is self._client:
                        await client.delete(self.key)
                await client.aclose()
        self._client = self._reader = None


def _redis_py() -> str:
    import redis

    return str(redis.__version__)


def _payload_of(size: int) -> bytes:
    return envelope.encode(envelope.build(subject=subjects.direct("bench"), sender_id="bench", content="x" * size))


async def _broker(url: str) -> loadgen.Broker:
    """``INFO server`` / ``INFO persistence`` (and ``CONFIG GET appendfsync`` where allowed)."""
    settings = RedisSettings.from_url(url)
    client = _raw_client(url)
    try:
        server = await client.info("server")
        persistence = await client.info("persistence")
        try:
            fsync = (await client.config_get("appendfsync")).get("appendfsync", "?")
        except Exception:  # CONFIG is often disabled on managed Redis: say so instead
            fsync = "unknown (CONFIG GET refused)"
    finally:
        await client.aclose()
    aof = "on" if persistence.get("aof_enabled") in (1, "1") else "off"
    durability = f"profile={settings.profile.value} (URL); server appendonly={aof}"
    durability += f", appendfsync={fsync}" if aof == "on" else ", no AOF (RDB snapshots at most)"
    return loadgen.Broker("redis", str(server.get("redis_version", "?")), durability)


async def _drop(url: str, tag: str, subs: list[Subscription]) -> None:
    await _drop_prefix(url, f"bench-{tag}")


TARGET = loadgen.Target(squadbus_url=lambda url, tag: _with_prefix(url, f"bench-{tag}"), raw=RawSide,
                        broker=_broker, cleanup=_drop)
"""How ``squadbus bench`` runs on redis://."""
