"""Several processes setting up one squad at once on RabbitMQ: the queues they create (inbox partitions,
group queues) are created once, under the namespace's setup lock, and only consumed when complete.

RabbitMQ (3.10 here) answers a declare of a quorum queue that another connection is creating before the
queue's Ra server runs; a ``basic.consume`` then crashes the channel and the broker closes the whole
connection with ``541 INTERNAL_ERROR`` (seen in CI: a simulate host failed to open its inboxes). And two
processes that both found a group queue missing both copied the log's backlog into it. Each Bus here has
its own connection, as a process would."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter
from uuid import UUID

import aio_pika
import pytest

from squadbus.backends.rabbitmq.placement import host_of, host_url
from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendTimeout

pytestmark = pytest.mark.rabbitmq

BUSES = 3


async def _count(seen: Counter[UUID], expected: int, got_all: asyncio.Event, delivery: Delivery) -> None:
    seen[delivery.message.id] += 1
    if sum(seen.values()) >= expected:
        got_all.set()


async def test_buses_opening_inboxes_of_a_new_squad_at_once_all_open(rabbitmq_url: str) -> None:
    # One Bus per host placed by partition (each reads its partitions, from its first open on), 48 agents
    # placed on them, all opened at once on a squad nobody opened before; five fresh squads.
    agents = [f"a{i}" for i in range(48)]
    for _ in range(5):
        url = rabbitmq_url.replace("namespace=", f"namespace=r{uuid.uuid4().hex[:4]}-")
        buses = [Bus.from_url(host_url(url, h, BUSES)) for h in range(BUSES)]
        try:
            await asyncio.gather(*(bus.start() for bus in buses))
            inboxes = [buses[host_of(url, agent, BUSES)].inbox(agent, broadcasts=False) for agent in agents]
            await asyncio.gather(*(inbox.open() for inbox in inboxes))
            sent = await asyncio.gather(*(buses[0].send("pm", inbox.agent_id, "hi") for inbox in inboxes))
            got = await asyncio.gather(*(inbox.get(20) for inbox in inboxes))
            assert [d.message.id for d in got] == [m.id for m in sent]
            await asyncio.gather(*(d.ack() for d in got))
        finally:
            await asyncio.gather(*(bus.close() for bus in buses))


async def test_buses_creating_one_group_at_once_copy_the_backlog_once(rabbitmq_url: str) -> None:
    for _ in range(3):
        url = rabbitmq_url.replace("namespace=", f"namespace=g{uuid.uuid4().hex[:4]}-")
        async with Bus.from_url(url) as sender:
            sent = [(await sender.send("pm", "dev-1", f"m{i}")).id for i in range(20)]
        seen: Counter[UUID] = Counter()
        got_all = asyncio.Event()
        handle = functools.partial(_count, seen, len(sent), got_all)
        buses = [Bus.from_url(url) for _ in range(BUSES)]
        try:
            await asyncio.gather(*(bus.start() for bus in buses))
            options = ConsumerOptions(start=StartFrom.EARLIEST)
            await asyncio.gather(*(bus.subscribe(subjects.direct("dev-1"), handle, group="audit", options=options)
                                   for bus in buses))
            await asyncio.wait_for(got_all.wait(), 20)
            await asyncio.sleep(0.5)  # a second copy of the backlog would arrive meanwhile
        finally:
            await asyncio.gather(*(bus.close() for bus in buses))
        assert sorted(seen) == sorted(sent)
        assert [m for m, n in seen.items() if n > 1] == [], "delivered more than once"



async def test_a_held_setup_lock_is_waited_for_within_setup_timeout_and_freed_by_its_holders_crash(
        rabbitmq_url: str) -> None:
    url = f"{rabbitmq_url}&setup_timeout=0.5"
    settings = RabbitSettings.from_url(url)
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    holder = await aio_pika.connect(settings.driver_url())  # another process, in the middle of a setup
    try:
        channel = await holder.channel()
        await channel.declare_queue(settings.setup_lock_queue, exclusive=True)
        async with Bus.from_url(url) as bus:
            started = time.monotonic()
            with pytest.raises(BackendTimeout, match="setup lock"):
                await bus.subscribe(subjects.direct("dev-1"), got.put, group="audit")
            assert time.monotonic() - started >= 0.5
            await holder.close()  # its process dies: the broker drops the exclusive queue with it
            await bus.subscribe(subjects.direct("dev-1"), got.put, group="audit")
            sent = await bus.send("pm", "dev-1", "hi")
            delivery = await asyncio.wait_for(got.get(), 10)
            assert delivery.message.id == sent.id
    finally:
        await holder.close()


async def test_a_take_of_the_setup_lock_cancelled_in_the_declare_gives_it_back(
        rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel that arrives once the broker created the lock queue for this connection, before its answer is
    read, must not leave the lock held until this Bus closes: other processes would wait for it."""
    url = f"{rabbitmq_url}&setup_timeout=0.5"
    lock = RabbitSettings.from_url(url).setup_lock_queue
    declare = aio_pika.Channel.declare_queue
    cancelled: list[str] = []

    async def declare_then_cancelled(self: aio_pika.Channel, name: str | None = None, **kwargs: object) -> object:
        queue = await declare(self, name, **kwargs)  # type: ignore[arg-type]
        if name == lock and not cancelled:
            cancelled.append(name)
            raise asyncio.CancelledError  # as if cancelled right after the broker answered
        return queue

    monkeypatch.setattr(aio_pika.Channel, "declare_queue", declare_then_cancelled)
    got: asyncio.Queue[Delivery] = asyncio.Queue()
    async with Bus.from_url(url) as first, Bus.from_url(url) as other:
        with pytest.raises(asyncio.CancelledError):
            await first.subscribe(subjects.direct("dev-1"), got.put, group="audit")
        assert cancelled == [lock]
        await other.subscribe(subjects.direct("dev-1"), got.put, group="audit")  # not BackendTimeout
        sent = await other.send("pm", "dev-1", "hi")
        delivery = await asyncio.wait_for(got.get(), 10)
        assert delivery.message.id == sent.id
