"""RabbitMQ request/reply latency: direct reply-to vs the Bus's pub/sub replies vs raw aio-pika, same run.

    python bench/bench_rabbitmq_request.py [--count 2000] [--rounds 3] [--concurrency 1] [--url amqp://...]

Each line makes ``count`` requests per round from ``concurrency`` loops (1: sequential, one request in
flight) and records request -> reply times; the lines run interleaved, ``rounds`` times, samples pooled
per line (per-round p50s in the notes). Without ``--url`` a private node is started in a temp dir.

* squadbus direct reply-to: ``Bus.request`` on ``amqp://`` today (the backend's Requester): the request
  is published with confirms to the exchange (log stream + the responder's quorum queue), the reply
  comes back on the requester's ``amq.rabbitmq.reply-to`` consumer;
* squadbus pub/sub replies: the same Bus with the Requester hidden, i.e. the path before it: the reply
  is published with confirms to the exchange too (log stream + the requester's exclusive reply queue);
* aio-pika raw direct reply-to: the same broker work as the first line written by hand (a topic
  exchange -> a quorum queue + a stream; the requester consumes ``amq.rabbitmq.reply-to`` no-ack on the
  channel it publishes on, awaiting the request's confirm; the responder publishes the reply to the
  default exchange, awaits its confirm, then acks);
* squadbus send alone: ``Bus.send`` to a subject a group reads (the request's own write: log stream +
  a quorum queue, confirmed), no reply: how much of a request is its publish.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import aio_pika.abc

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.benchmarks.stats import Environment, Result, format_table, interleaved_rounds, merged, percentile
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.testing.servers.rabbitmq import RabbitServer

CONTENT = "status?"
REPLY_QUEUE = "amq.rabbitmq.reply-to"


class PubSubReplies(RabbitBackend):
    """The RabbitMQ backend without its Requester: the Bus falls back to its own reply subscription."""

    request = None  # type: ignore[assignment]  # hides the method from isinstance(backend, Requester)


async def _loops(count: int, concurrency: int, one: Callable[[], Awaitable[object]]) -> tuple[float, list[float]]:
    """``count`` calls of ``one`` from ``concurrency`` loops: (seconds, latency of each in ms)."""
    latencies: list[float] = []
    remaining = count

    async def loop() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            await one()
            latencies.append((time.perf_counter() - sent) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


async def squadbus_requests(url: str, count: int, concurrency: int, *, direct: bool) -> Result:
    agent = f"bench-rr-{secrets.token_hex(4)}"
    name = "squadbus: direct reply-to" if direct else "squadbus: pub/sub replies (before)"
    backend = RabbitBackend(RabbitSettings.from_url(url)) if direct else PubSubReplies(RabbitSettings.from_url(url))
    async with Bus.from_url(url) as responder_bus, Bus(backend) as bus:
        async def answer(delivery: Delivery) -> None:
            await responder_bus.reply(delivery.message, agent, "ok")

        await responder_bus.subscribe(subjects.direct(agent), answer, group="bench-responder",
                                      options=ConsumerOptions(start=StartFrom.NEW, max_in_flight=concurrency))
        await bus.request("pm", agent, CONTENT, timeout=30)  # opens the reply consumer, outside the timing
        elapsed, latencies = await _loops(count, concurrency,
                                          lambda: bus.request("pm", agent, CONTENT, timeout=30))
        return Result(name, count, elapsed, latencies)


async def squadbus_sends(url: str, count: int, concurrency: int) -> Result:
    agent = f"bench-send-{secrets.token_hex(4)}"

    async def ignore(delivery: Delivery) -> None:
        pass

    async with Bus.from_url(url) as responder_bus, Bus.from_url(url) as bus:
        await responder_bus.subscribe(subjects.direct(agent), ignore, group="bench-responder",
                                      options=ConsumerOptions(start=StartFrom.NEW, max_in_flight=concurrency))
        await bus.send("pm", agent, CONTENT)
        elapsed, latencies = await _loops(count, concurrency, lambda: bus.send("pm", agent, CONTENT))
        return Result("squadbus: the request's send alone", count, elapsed, latencies)


async def raw_requests(url: str, count: int, concurrency: int) -> Result:
    settings = RabbitSettings.from_url(url)
    tag = secrets.token_hex(4)
    exchange_name, queue_name, log_name = f"raw-rr-{tag}", f"raw-rr-{tag}.q", f"raw-rr-{tag}.log"
    key = f"agent.message.raw-{tag}"
    payload = envelope.encode(envelope.build(subject=key, sender_id="pm", content=CONTENT))
    responder = await aio_pika.connect(settings.driver_url())
    requester = await aio_pika.connect(settings.driver_url())
    try:
        setup = await responder.channel()
        exchange = await setup.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await setup.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, "agent.message.*")
        log = await setup.declare_queue(log_name, durable=True, arguments={"x-queue-type": "stream"})
        await log.bind(exchange, "#")

        answers = await responder.channel(publisher_confirms=True)
        await answers.set_qos(prefetch_count=concurrency)

        async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await answers.default_exchange.publish(
                aio_pika.Message(payload, correlation_id=message.correlation_id),
                routing_key=message.reply_to or "", mandatory=False)
            await message.ack()

        await (await answers.get_queue(queue_name)).consume(answer)

        channel = await requester.channel(publisher_confirms=True)
        raw = await channel.get_underlay_channel()
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: object) -> None:
            correlation = message.header.properties.correlation_id  # type: ignore[attr-defined]
            fut = waiting.pop(correlation or "", None)
            if fut is not None and not fut.done():
                fut.set_result(message.body)  # type: ignore[attr-defined]

        await raw.basic_consume(REPLY_QUEUE, on_reply, no_ack=True)
        request_exchange = await channel.get_exchange(exchange_name)
        loop = asyncio.get_running_loop()

        async def one() -> None:
            correlation = secrets.token_hex(8)
            fut = waiting[correlation] = loop.create_future()
            await request_exchange.publish(
                aio_pika.Message(payload, correlation_id=correlation, reply_to=REPLY_QUEUE,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=key, mandatory=False)
            await asyncio.wait_for(fut, 30)

        await one()
        elapsed, latencies = await _loops(count, concurrency, one)
        await answers.close()
        cleanup = await responder.channel()
        await cleanup.queue_delete(queue_name)
        await cleanup.queue_delete(log_name)
        await cleanup.exchange_delete(exchange_name)
        return Result("aio-pika raw: direct reply-to", count, elapsed, latencies)
    finally:
        await requester.close()
        await responder.close()


async def run(url: str, count: int, rounds: int, concurrency: int) -> list[Result]:
    async with Bus.from_url(url):
        pass  # declares the exchange and the log once, outside the measured runs
    lines = await interleaved_rounds(
        rounds,
        lambda: raw_requests(url, count, concurrency),
        lambda: squadbus_requests(url, count, concurrency, direct=True),
        lambda: squadbus_requests(url, count, concurrency, direct=False),
        lambda: squadbus_sends(url, count, concurrency),
    )
    pooled = []
    for line in lines:
        total = line[0]
        for more in line[1:]:
            total = merged(total, more)
        p50s = ", ".join(f"{percentile(sorted(r.latencies_ms), 0.5):.2f}" for r in line)
        p99s = ", ".join(f"{percentile(sorted(r.latencies_ms), 0.99):.2f}" for r in line)
        total.notes = f"{len(line)} rounds pooled; p50 per round {p50s} ms; p99 per round {p99s} ms"
        pooled.append(total)
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="sequential requests per line and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--concurrency", type=int, default=1, help="request loops at once (1: sequential)")
    parser.add_argument("--url", help="an existing node (default: a private node in a temp dir)")
    args = parser.parse_args()
    if args.url:
        results = asyncio.run(run(args.url, args.count, args.rounds, args.concurrency))
    else:
        with tempfile.TemporaryDirectory(prefix="squadbus-bench-rabbitmq-") as tmp, RabbitServer(Path(tmp)) as server:
            results = asyncio.run(run(f"{server.url}?namespace=bench", args.count, args.rounds, args.concurrency))
    out = sys.stdout
    out.write(format_table(results) + "\n")
    for r in results:
        out.write(f"{r.name}: {r.notes}\n")
    document = {"results": [r.summary() for r in results], "count": args.count, "rounds": args.rounds,
                "concurrency": args.concurrency,
                "environment": Environment.current().as_dict()}
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
