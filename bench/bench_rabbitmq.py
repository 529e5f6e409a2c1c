"""RabbitMQ benchmark: squadbus vs raw aio-pika on a private RabbitMQ node, same run, 1 KiB messages.

    python bench/bench_rabbitmq.py [--count 5000] [--rounds 3] [--rate 300] [--profile durable|fast]

Throughput: ``count`` messages published with publisher confirms and consumed
+ acked by one consumer, from the first publish to the last ack. Two raw
aio-pika baselines: a topic exchange routing to one quorum queue (what a
RabbitMQ user writes), and the same plus the stream queue squadbus keeps as
its log (the same broker work as squadbus). Raw publishes keep ``WINDOW``
confirms in flight; squadbus runs ``SENDERS`` concurrent ``Bus.send`` loops
(each returns after its confirm) into a group subscription. The lines run
interleaved, ``rounds`` times; each line reports its median round and the
ratios are medians of per-round ratios (a shared machine drifts).

Latency: an open loop at ``rate`` msgs/s for ~5 s (``openloop.drive``), from
the intended send time to the handler, p50/p99/p99.9, raw (quorum queue +
stream) beside squadbus. Prints a table and one JSON line.

``--profile fast``: the raw lines use a classic queue and transient messages (what
squadbus's ``profile=fast`` does; the stream stays), squadbus runs with
``profile=fast``, and a fourth line, squadbus under ``durable``, runs interleaved
with them for the fast/durable ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import aio_pika.abc

from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Environment, Result, format_table, interleaved_rounds, median_of, paired_ratio
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.testing.servers.rabbitmq import RabbitServer

CONTENT = "x" * 1024
WINDOW = 1000
SENDERS = 1000
PREFETCH = 500
LATENCY_SECONDS = 5.0


def _payload(agent: str) -> bytes:
    return envelope.encode(envelope.build(subject=subjects.direct(agent), sender_id="pm", content=CONTENT))


class RawTopology:
    """A private exchange, quorum queue (and optionally a stream bound beside it) for one raw run."""

    def __init__(self, url: str, *, with_log: bool) -> None:
        self.settings = RabbitSettings.from_url(url)
        fast = self.settings.classic_queues
        self.queue_type = "classic" if fast else "quorum"
        self.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT if fast else aio_pika.DeliveryMode.PERSISTENT
        self.with_log = with_log
        tag = secrets.token_hex(4)
        self.exchange_name, self.queue_name, self.log_name = f"raw-{tag}", f"raw-{tag}.q", f"raw-{tag}.log"
        self.key = f"agent.message.raw-{tag}"
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self.consumer: aio_pika.abc.AbstractChannel | None = None

    async def __aenter__(self) -> RawTopology:
        self.connection = await aio_pika.connect(self.settings.driver_url())
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments={"x-queue-type": self.queue_type})
        await queue.bind(exchange, "agent.message.*")
        if self.with_log:
            log = await channel.declare_queue(self.log_name, durable=True, arguments={"x-queue-type": "stream"})
            await log.bind(exchange, "#")
        await channel.close()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.connection is not None
        if self.consumer is not None:
            await self.consumer.close()
        channel = await self.connection.channel()
        for name in (self.queue_name, self.log_name):
            if name != self.log_name or self.with_log:
                await channel.queue_delete(name)
        await channel.exchange_delete(self.exchange_name)
        await self.connection.close()

    async def consume(self, on_body: Callable[[aio_pika.abc.AbstractIncomingMessage], None]) -> None:
        assert self.connection is not None
        channel = self.consumer = await self.connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await channel.get_queue(self.queue_name)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            on_body(message)
            await message.ack()

        await queue.consume(on_message)

    async def publisher(self) -> aio_pika.abc.AbstractExchange:
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=True)
        return await channel.get_exchange(self.exchange_name)


async def raw_throughput(url: str, count: int, *, with_log: bool) -> Result:
    async with RawTopology(url, with_log=with_log) as raw:
        name = f"aio-pika raw: confirms -> {raw.queue_type}" + (" + stream" if with_log else "")
        done = asyncio.Event()
        seen = 0

        def on_body(_: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        await raw.consume(on_body)
        exchange = await raw.publisher()
        payload = _payload("raw")
        window = asyncio.Semaphore(WINDOW)

        async def publish() -> None:
            async with window:
                await exchange.publish(aio_pika.Message(payload, message_id=secrets.token_hex(16),
                                                        delivery_mode=raw.delivery_mode),
                                       routing_key=raw.key, mandatory=False)

        start = time.perf_counter()
        await asyncio.gather(*(publish() for _ in range(count)))
        await done.wait()
        return Result(name, count, time.perf_counter() - start)


async def squadbus_throughput(url: str, count: int) -> Result:
    agent = f"bench-{secrets.token_hex(4)}"
    async with Bus.from_url(url) as bus:
        done = asyncio.Event()
        seen = 0

        async def handler(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1
            if seen >= count:
                done.set()

        options = ConsumerOptions(batch_size=PREFETCH, start=StartFrom.NEW)
        await bus.subscribe(subjects.direct(agent), handler, group="bench", options=options)
        remaining = count

        async def sender() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await bus.send("pm", agent, CONTENT)

        start = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(min(SENDERS, count))))
        await done.wait()
        profile = RabbitSettings.from_url(url).profile.value
        return Result(f"squadbus rabbitmq {profile}: Bus.send -> group handler", count, time.perf_counter() - start)


async def raw_latency(url: str, count: int, rate: float) -> Result:
    latencies: list[float] = []
    async with RawTopology(url, with_log=True) as raw:
        done = asyncio.Event()

        def on_body(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            latencies.append((time.perf_counter() - float(str((message.headers or {})["due"]))) * 1000)
            if len(latencies) >= count:
                done.set()

        await raw.consume(on_body)
        exchange = await raw.publisher()
        payload = _payload("raw")

        async def send(i: int, due: float) -> None:
            await exchange.publish(aio_pika.Message(payload, headers={"due": repr(due)},
                                                    delivery_mode=raw.delivery_mode),
                                   routing_key=raw.key, mandatory=False)

        elapsed = await drive(rate, count, send)
        await done.wait()
        return Result(f"aio-pika raw: {raw.queue_type} + stream @{rate:g}/s", count, elapsed, latencies)


async def squadbus_latency(url: str, count: int, rate: float) -> Result:
    agent = f"bench-lat-{secrets.token_hex(4)}"
    latencies: list[float] = []
    async with Bus.from_url(url) as bus:
        done = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            latencies.append((time.perf_counter() - float(delivery.message.headers["due"])) * 1000)
            if len(latencies) >= count:
                done.set()

        await bus.subscribe(subjects.direct(agent), handler, group="bench",
                            options=ConsumerOptions(start=StartFrom.NEW))

        async def send(i: int, due: float) -> None:
            await bus.send("pm", agent, CONTENT, headers={"due": repr(due)})

        elapsed = await drive(rate, count, send)
        await done.wait()
        profile = RabbitSettings.from_url(url).profile.value
        return Result(f"squadbus rabbitmq {profile}: send -> handler @{rate:g}/s", count, elapsed, latencies)


async def run(url: str, count: int, rounds: int, rate: float) -> tuple[list[Result], dict[str, object]]:
    fast = RabbitSettings.from_url(url).classic_queues
    durable_url = url.replace("&profile=fast", "")
    async with Bus.from_url(url):
        pass  # declares the exchange and the log once, outside the measured runs
    makers = [
        lambda: raw_throughput(url, count, with_log=False),
        lambda: raw_throughput(url, count, with_log=True),
        lambda: squadbus_throughput(url, count),
    ]
    if fast:
        makers.append(lambda: squadbus_throughput(durable_url, count))
    measured = await interleaved_rounds(rounds, *makers)
    raw, raw_log, ours = measured[:3]
    kind = "classic" if fast else "quorum"
    vs_raw, rounds_raw = paired_ratio(ours, raw)
    vs_same, rounds_same = paired_ratio(ours, raw_log)
    lines = [median_of(rounds_of) for rounds_of in measured]
    lines[2].notes = f"ratio vs raw {kind} = {vs_raw:.2f}, vs raw {kind} + stream = {vs_same:.2f}; " + lines[2].notes
    latency_count = max(100, int(rate * LATENCY_SECONDS))
    lines.append(await raw_latency(url, latency_count, rate))
    lines.append(await squadbus_latency(url, latency_count, rate))
    facts: dict[str, object] = {
        "queue_type": kind, "ratio_vs_raw_queue": round(vs_raw, 3),
        "ratio_rounds_vs_raw_queue": [round(r, 3) for r in rounds_raw],
        "ratio_vs_raw_queue_stream": round(vs_same, 3),
        "ratio_rounds_vs_raw_queue_stream": [round(r, 3) for r in rounds_same], "target_ratio": 0.8,
    }
    if fast:
        vs_durable, rounds_durable = paired_ratio(ours, measured[3])
        facts["fast_vs_durable"] = round(vs_durable, 3)
        facts["fast_vs_durable_rounds"] = [round(r, 3) for r in rounds_durable]
        lines.append(await squadbus_latency(durable_url, latency_count, rate))
    return lines, facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="messages per throughput round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per throughput line")
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop rate for the latency test")
    parser.add_argument("--profile", choices=("durable", "fast"), default="durable",
                        help="squadbus profile and the raw lines' queue type (fast: classic + transient)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="squadbus-bench-rabbitmq-") as tmp, RabbitServer(Path(tmp)) as server:
        url = f"{server.url}?namespace=bench" + ("&profile=fast" if args.profile == "fast" else "")
        results, facts = asyncio.run(run(url, args.count, args.rounds, args.rate))
    out = sys.stdout
    out.write(format_table(results) + "\n")
    kind = facts["queue_type"]
    out.write(f"throughput ratio squadbus/raw: {facts['ratio_vs_raw_queue']} vs {kind} only, "
              f"{facts['ratio_vs_raw_queue_stream']} vs {kind} + stream (target >= 0.8)\n")
    if "fast_vs_durable" in facts:
        out.write(f"squadbus fast / durable: {facts['fast_vs_durable']} (rounds {facts['fast_vs_durable_rounds']})\n")
    document = {"results": [r.summary() for r in results], **facts, "count": args.count, "rounds": args.rounds,
                "profile": args.profile,
                "environment": Environment.current().as_dict()}
    out.write(json.dumps(document, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
