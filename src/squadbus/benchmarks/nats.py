"""squadbus on NATS JetStream vs raw nats-py doing the same work, in the same run, 1 KiB messages.

Throughput: ``count`` messages published and consumed by one durable pull
consumer. The raw baseline publishes with ``js.publish_async`` (every message
with a ``Nats-Msg-Id``, the same envelope bytes squadbus sends) and consumes
with ``fetch(500)`` + ``ack`` per message; squadbus runs ``SENDERS``
concurrent ``Bus.send`` loops (each send returns after its PubAck) into a
group subscription. Both count from the first publish to the last message
consumed.

Latency: an open loop at ``rate`` msgs/s (``openloop.drive``), from the
intended send time to the handler, p50/p99/p99.9. The raw consumer uses
``fetch(1)``: nats-py's ``fetch(n>1)`` waits for ``n`` messages or its timeout,
which would measure the timeout, not the broker.

Request/reply: sequential round trips, squadbus ``Bus.request`` (the request
is stored in the stream and consumed by a group; the reply comes back on core
NATS) beside raw ``nc.request`` on core NATS (nothing stored).

``run`` is that fixed suite (``squadbus bench --suite``, ``bench/bench_nats.py``);
``TARGET`` is what ``squadbus bench`` loads on nats:// (:mod:`.loadgen`, raw side :class:`RawSide`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from squadbus.backends.nats import NatsSettings
from squadbus.benchmarks import loadgen
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result, ratio
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription
from squadbus.core.bus import Bus

CONTENT = "x" * 1024
FETCH = 500
SENDERS = 4000  # the same PubAck window as the raw run (nats-py publish_async_max_pending)
LATENCY_SECONDS = 5.0
REQUESTS = 1000


def _payload(agent: str) -> bytes:
    return envelope.encode(envelope.build(subject=subjects.direct(agent), sender_id="pm", content=CONTENT))


async def _raw_connect(url: str) -> Client:
    s = NatsSettings.from_url(url)
    nc = Client()
    await nc.connect(servers=list(s.servers), user=s.user, password=s.password, token=s.token, tls=s.ssl_context())
    return nc


async def _cleanup(url: str, agents: list[str], consumers: list[str]) -> None:
    """Delete the bench's consumers and purge its subjects, so a shared server keeps no bench data."""
    nc = await _raw_connect(url)
    stream = NatsSettings.from_url(url).stream
    js = nc.jetstream()
    try:
        for name in consumers:
            with contextlib.suppress(Exception):
                await js.delete_consumer(stream, name)
        for agent in agents:
            with contextlib.suppress(Exception):
                await js.purge_stream(stream, subject=subjects.direct(agent))
    finally:
        await nc.close()


async def _raw_consumer(js: Any, stream: str, subject: str) -> Any:
    name = f"raw-{secrets.token_hex(4)}"
    await js.add_consumer(stream, api.ConsumerConfig(
        name=name, durable_name=name, filter_subject=subject, ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.NEW, max_ack_pending=20_000,
    ))
    return name, await js.pull_subscribe_bind(name, stream=stream)


async def raw_throughput(url: str, count: int) -> Result:
    """publish_async (Nats-Msg-Id) + durable pull fetch(500) + ack with nats-py, nothing else."""
    agent = f"bench-raw-{secrets.token_hex(4)}"
    subject, payload, stream = subjects.direct(agent), _payload(agent), NatsSettings.from_url(url).stream
    nc = await _raw_connect(url)
    js = nc.jetstream()
    name = ""
    try:
        name, sub = await _raw_consumer(js, stream, subject)
        done = 0

        async def consume() -> None:
            nonlocal done
            while done < count:
                try:
                    msgs = await sub.fetch(FETCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                done += len(msgs)

        start = time.perf_counter()
        consumer = asyncio.create_task(consume())
        futures = [
            await js.publish_async(subject, payload, headers={"Nats-Msg-Id": uuid.uuid4().hex}) for _ in range(count)
        ]
        await asyncio.gather(*futures)
        await consumer
        return Result("nats-py raw: publish_async + fetch(500)/ack", count, time.perf_counter() - start)
    finally:
        await nc.close()
        await _cleanup(url, [agent], [name] if name else [])


async def squadbus_throughput(url: str, count: int) -> Result:
    """Concurrent Bus.send loops (each waits for its PubAck) into a group subscription."""
    agent, group = f"bench-{secrets.token_hex(4)}", "bench"
    async with Bus.from_url(url) as bus:
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        options = ConsumerOptions(batch_size=FETCH, start=StartFrom.NEW)
        sub = await bus.subscribe(subjects.direct(agent), handler, group=group, options=options)
        remaining = count

        async def sender() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await bus.send("pm", agent, CONTENT)

        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(min(SENDERS, count))))
        await done.wait()
        elapsed = time.perf_counter() - start
        consumer = sub.consumer  # type: ignore[attr-defined]
    await _cleanup(url, [agent], [consumer])
    return Result("squadbus nats: Bus.send -> group handler", count, elapsed)


async def raw_latency(url: str, count: int, rate: float) -> Result:
    """Open-loop js.publish at ``rate``; a fetch(1)/ack consumer measures from the due time."""
    agent = f"bench-rawlat-{secrets.token_hex(4)}"
    subject, payload, stream = subjects.direct(agent), _payload(agent), NatsSettings.from_url(url).stream
    nc = await _raw_connect(url)
    js = nc.jetstream()
    latencies: list[float] = []
    name = ""
    try:
        name, sub = await _raw_consumer(js, stream, subject)

        async def consume() -> None:
            while len(latencies) < count:
                try:
                    msgs: list[Msg] = await sub.fetch(1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    latencies.append((time.perf_counter() - float(msg.headers["due"])) * 1000)  # type: ignore[index]
                    await msg.ack()

        async def send(i: int, due: float) -> None:
            await js.publish(subject, payload, headers={"Nats-Msg-Id": uuid.uuid4().hex, "due": repr(due)})

        consumer = asyncio.create_task(consume())
        elapsed = await drive(rate, count, send)
        await consumer
        return Result(f"nats-py raw: js.publish/fetch(1) @{rate:g}/s", count, elapsed, latencies)
    finally:
        await nc.close()
        await _cleanup(url, [agent], [name] if name else [])


async def squadbus_latency(url: str, count: int, rate: float) -> Result:
    """Open-loop Bus.send at ``rate``; the group handler measures from the due time."""
    agent = f"bench-lat-{secrets.token_hex(4)}"
    latencies: list[float] = []
    async with Bus.from_url(url) as bus:
        done = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            latencies.append((time.perf_counter() - float(delivery.message.headers["due"])) * 1000)
            if len(latencies) >= count:
                done.set()

        sub = await bus.subscribe(subjects.direct(agent), handler, group="bench",
                                  options=ConsumerOptions(start=StartFrom.NEW))

        async def send(i: int, due: float) -> None:
            await bus.send("pm", agent, CONTENT, headers={"due": repr(due)}, task_execution_id=uuid.uuid4())

        elapsed = await drive(rate, count, send)
        await done.wait()
        consumer = sub.consumer  # type: ignore[attr-defined]
    await _cleanup(url, [agent], [consumer])
    return Result(f"squadbus nats: send -> handler @{rate:g}/s", count, elapsed, latencies)


async def raw_request_reply(url: str, count: int) -> Result:
    """Sequential nc.request round trips to a core-NATS responder."""
    nc = await _raw_connect(url)
    subject, payload = f"bench.rr.{secrets.token_hex(4)}", _payload("rr")
    latencies: list[float] = []
    try:
        async def respond(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, cb=respond)
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            await nc.request(subject, payload, timeout=5)
            latencies.append((time.perf_counter() - t0) * 1000)
        return Result("nats-py raw: nc.request (core NATS)", count, time.perf_counter() - start, latencies)
    finally:
        await nc.close()


async def squadbus_request_reply(url: str, count: int) -> Result:
    """Sequential Bus.request round trips to a group responder using Bus.reply."""
    agent = f"bench-rr-{secrets.token_hex(4)}"
    latencies: list[float] = []
    async with Bus.from_url(url) as requester, Bus.from_url(url) as responder:
        async def answer(delivery: Delivery) -> None:
            await responder.reply(delivery.message, agent, delivery.message.content)

        sub = await responder.subscribe(subjects.direct(agent), answer, group="bench",
                                        options=ConsumerOptions(start=StartFrom.NEW))
        start = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            await requester.request("pm", agent, CONTENT, timeout=5)
            latencies.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
        consumer = sub.consumer  # type: ignore[attr-defined]
    await _cleanup(url, [agent], [consumer])
    return Result("squadbus nats: Bus.request (JetStream + core reply)", count, elapsed, latencies)


async def run(*, url: str, count: int, rate: float) -> list[Result]:
    """Throughput (``count`` messages), open-loop latency (``rate`` msgs/s for ~5 s) and request/reply
    round trips against ``url``; the squadbus throughput line's notes carry the ratio to raw."""
    async with Bus.from_url(url):
        pass  # creates the stream (with the URL's profile) if it is missing, for the raw runs too
    raw = await raw_throughput(url, count)
    ours = await squadbus_throughput(url, count)
    ours.notes = f"ratio vs raw = {ratio(ours, raw):.2f}"
    latency_count = max(100, min(count, int(rate * LATENCY_SECONDS)))
    raw_lat = await raw_latency(url, latency_count, rate)
    our_lat = await squadbus_latency(url, latency_count, rate)
    requests = max(10, min(count, REQUESTS))
    raw_rr = await raw_request_reply(url, requests)
    our_rr = await squadbus_request_reply(url, requests)
    return [raw, ours, raw_lat, our_lat, raw_rr, our_rr]


def summary(results: list[Result]) -> dict[str, Any]:
    """The headline numbers of a ``run`` for the JSON line."""
    raw, ours = results[0], results[1]
    return {"throughput_ratio": round(ratio(ours, raw), 3), "target_ratio": 0.8}


# ---- squadbus bench: the raw side on nats:// -------------------------------------------------------


class RawSide:
    """The raw side of ``squadbus bench`` on NATS: each sender awaits one ``js.publish`` (with a
    ``Nats-Msg-Id``, as squadbus), a durable pull consumer acks each message with ``msg.ack()``.

    The pull loop keeps two pull requests of ``FETCH`` messages (1 s expiry) waiting at the server,
    sending a new one as each is served or expires; ``fetch(n)`` would wait for ``n`` messages
    or its timeout, which measures the timeout at low rates (see the module docstring).
    """

    PULLS = 2

    def __init__(self, url: str, size: int, tag: str) -> None:
        self.name = f"nats-py {_nats_py()}: js.publish awaited -> pull consumer + ack"
        self.url = url
        self.settings = NatsSettings.from_url(url)
        self.agent = f"bench-raw-{tag}"
        self._nc: Client | None = None
        self._consumer = ""
        self._payload = envelope.encode(envelope.build(subject=subjects.direct(self.agent), sender_id="bench",
                                                       content="x" * (size - loadgen.INDEX_DIGITS)))

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        t0 = time.perf_counter()
        nc = self._nc = await _raw_connect(self.url)
        connected = time.perf_counter()
        js = nc.jetstream()
        stream = self.settings.stream
        name = self._consumer = f"raw-{secrets.token_hex(4)}"
        await js.add_consumer(stream, api.ConsumerConfig(
            name=name, durable_name=name, filter_subject=subjects.direct(self.agent),
            ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.NEW, max_ack_pending=20_000,
        ))
        inbox = nc.new_inbox()
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
        request = json.dumps({"batch": FETCH, "expires": 1_000_000_000}).encode()
        left: collections.deque[int] = collections.deque()

        async def pull() -> None:
            left.append(FETCH)
            await nc.publish(next_subject, request, reply=inbox)

        async def on_message(msg: Msg) -> None:
            if msg.headers and "Status" in msg.headers:  # 404/408/409: the oldest request ended
                if left:
                    left.popleft()
            else:
                deliver(loadgen.index_of(msg.data))
                await msg.ack()
                if left:
                    left[0] -= 1
                    if left[0] <= 0:
                        left.popleft()
            while len(left) < self.PULLS:
                await pull()

        await nc.subscribe(inbox, cb=on_message)
        for _ in range(self.PULLS):
            await pull()
        return {"connect_s": connected - t0, "subscribe_s": time.perf_counter() - connected}

    async def publish(self, index: int) -> None:
        assert self._nc is not None
        await self._nc.jetstream().publish(subjects.direct(self.agent), loadgen.stamp(index).encode() + self._payload,
                                           headers={"Nats-Msg-Id": uuid.uuid4().hex})

    async def stop(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            await _cleanup(self.url, [self.agent], [self._consumer] if self._consumer else [])


def _nats_py() -> str:
    from nats.aio.client import __version__

    return str(__version__)


async def _broker(url: str) -> loadgen.Broker:
    """The server's version (INFO) and the stream's storage and replicas (STREAM.INFO)."""
    settings = NatsSettings.from_url(url)
    async with Bus.from_url(url):
        pass  # creates the stream (with the URL's profile) if it is missing, for the raw side too
    nc = await _raw_connect(url)
    try:
        v = nc.connected_server_version
        version = f"{v.major}.{v.minor}.{v.patch}"
        info = await nc.jetstream().stream_info(settings.stream)
    finally:
        await nc.close()
    storage = getattr(info.config.storage, "value", info.config.storage)
    durability = (f"profile={settings.profile.value} (URL); stream {settings.stream}: storage={storage}, "
                  f"replicas={info.config.num_replicas or 1} (fsync per the server's sync_interval)")
    return loadgen.Broker("nats-server (JetStream)", version, durability)


async def _drop(url: str, tag: str, subs: list[Subscription]) -> None:
    consumers = [name for sub in subs if (name := getattr(sub, "consumer", None))]
    await _cleanup(url, [f"bench-{tag}"], consumers)


TARGET = loadgen.Target(squadbus_url=lambda url, tag: url, raw=RawSide, broker=_broker, cleanup=_drop)
"""How ``squadbus bench`` runs on nats:// (the squadbus side's agent is ``bench-<tag>``)."""
