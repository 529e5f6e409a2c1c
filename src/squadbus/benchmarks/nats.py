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
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from squadbus.backends.nats import NatsSettings
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result, ratio
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
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
