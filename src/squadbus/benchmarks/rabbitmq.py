"""``squadbus bench`` on ``amqp://``: squadbus beside raw aio-pika doing the same broker work, same run.

The raw side (:class:`RawSide`) builds what a RabbitMQ user would for one
recipient plus what squadbus keeps: a topic exchange, a quorum queue bound
to the recipient's subject and a stream queue bound with ``#`` beside it (the
log). Each sender awaits one publish with publisher confirms; one consumer
(prefetch ``PREFETCH``) acks each message with ``IncomingMessage.ack()``.
The squadbus side runs with a ``namespace`` of its own per run (exchange, log
stream, registry stream and group queue), removed afterwards with the raw
side's objects. The older fixed suite is ``bench/bench_rabbitmq.py`` (it
starts its own node); ``TARGET`` is what ``squadbus bench`` loads on amqp://.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import aio_pika
import aio_pika.abc

from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.benchmarks import loadgen
from squadbus.core import envelope, subjects
from squadbus.core.backend import Subscription

PREFETCH = 500


def _bench_url(url: str, tag: str) -> str:
    """``url`` with a namespace of its own for run ``tag`` (a later ``namespace=`` wins)."""
    return f"{url}{'&' if '?' in url else '?'}namespace=bench-{tag}"


async def _connect(url: str) -> aio_pika.abc.AbstractConnection:
    s = RabbitSettings.from_url(url)
    return await aio_pika.connect(s.driver_url(), timeout=s.connect_timeout, ssl_context=s.ssl_context())


async def _delete(url: str, queues: list[str], exchanges: list[str]) -> None:
    """Delete ``queues`` and ``exchanges`` (missing ones are skipped), so a shared node keeps no bench data."""
    connection = await _connect(url)
    try:
        for name in queues:
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.queue_delete(name)
                await channel.close()
        for name in exchanges:
            with contextlib.suppress(Exception):
                channel = await connection.channel()
                await channel.exchange_delete(name)
                await channel.close()
    finally:
        await connection.close()


class RawSide:
    """The raw side of ``squadbus bench`` on RabbitMQ (see the module docstring)."""

    def __init__(self, url: str, size: int, tag: str) -> None:
        fast = RabbitSettings.from_url(url).classic_queues  # profile=fast: a classic queue, transient messages
        self.queue_type = "classic" if fast else "quorum"
        self.mode = aio_pika.DeliveryMode.NOT_PERSISTENT if fast else aio_pika.DeliveryMode.PERSISTENT
        self.name = (f"aio-pika {aio_pika.__version__}: publish + confirm awaited -> {self.queue_type} (+ stream) "
                     "-> consume + ack")
        self.url = url
        self.agent = f"bench-raw-{tag}"
        self.exchange_name, self.queue_name, self.log_name = f"raw-{tag}", f"raw-{tag}.q", f"raw-{tag}.log"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._payload = envelope.encode(envelope.build(subject=subjects.direct(self.agent), sender_id="bench",
                                                       content="x" * (size - loadgen.INDEX_DIGITS)))

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        t0 = time.perf_counter()
        connection = self._connection = await _connect(self.url)
        connected = time.perf_counter()
        setup = await connection.channel()
        exchange = await setup.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await setup.declare_queue(self.queue_name, durable=True, arguments={"x-queue-type": self.queue_type})
        await queue.bind(exchange, subjects.direct(self.agent))
        log = await setup.declare_queue(self.log_name, durable=True, arguments={"x-queue-type": "stream"})
        await log.bind(exchange, "#")
        await setup.close()
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=PREFETCH)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            deliver(loadgen.index_of(message.body))
            await message.ack()

        await (await consumer.get_queue(self.queue_name)).consume(on_message)
        publisher = await connection.channel(publisher_confirms=True)
        self._exchange = await publisher.get_exchange(self.exchange_name)
        return {"connect_s": connected - t0, "subscribe_s": time.perf_counter() - connected}

    async def publish(self, index: int) -> None:
        assert self._exchange is not None
        body = loadgen.stamp(index).encode() + self._payload
        await self._exchange.publish(aio_pika.Message(body, delivery_mode=self.mode),
                                     routing_key=subjects.direct(self.agent))

    async def stop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
            await _delete(self.url, [self.queue_name, self.log_name], [self.exchange_name])


async def _broker(url: str) -> loadgen.Broker:
    """The node's version (connection.start's server properties) and what a confirm means."""
    settings = RabbitSettings.from_url(url)
    connection = await _connect(url)
    try:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = properties.get("version", "?")
        version = version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()
    durability = (f"profile={settings.profile.value} (URL): persistent messages, confirm after the quorum "
                  "queue (fsynced WAL) and the log stream stored them")
    if settings.classic_queues:
        durability = (f"profile={settings.profile.value} (URL): transient messages, confirm once a classic queue "
                      "(memory) and the log stream took them")
    return loadgen.Broker("RabbitMQ", version, durability)


async def _drop(url: str, tag: str, subs: list[Subscription]) -> None:
    settings = RabbitSettings.from_url(_bench_url(url, tag))
    queues = [name for sub in subs if (name := getattr(sub, "queue_name", None))]
    await _delete(url, [*queues, settings.log_queue, settings.registry_queue], [settings.exchange])


TARGET = loadgen.Target(squadbus_url=_bench_url, raw=RawSide, broker=_broker, cleanup=_drop)
"""How ``squadbus bench`` runs on amqp:// (every run in a namespace of its own)."""
