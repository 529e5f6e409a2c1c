"""A cancelled close of the RabbitMQ inbox hub (backends/rabbitmq/inboxes.py) or of a subscription's source
(backends/rabbitmq/subscriber.py) raises CancelledError in its caller and still closes the channel (the source
requeues what it buffered first), so the broker gives the messages back, against a real node."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.inbox_source import INBOX_GROUP_PREFIX
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.rabbitmq


async def test_a_cancelled_hub_close_raises_and_still_closes_the_channel(rabbitmq_url: str) -> None:
    # e.g. asyncio.wait_for(bus.close(), t) timing out while a handler takes time to end: the caller is
    # cancelled (was: the close absorbed it and returned), and the hub still closes its channel.
    url = f"{rabbitmq_url}&inbox_partitions=1"
    agent = f"a-{uuid.uuid4().hex[:8]}"
    started = asyncio.Event()

    async def slow_to_end(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # ending takes a while
            raise

    bus = await Bus.from_url(url).start()
    try:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        await backend.open_inbox(agent, slow_to_end, group=INBOX_GROUP_PREFIX + agent, options=ConsumerOptions())
        sent = await bus.send("pm", agent, "handled while the hub closes")
        await asyncio.wait_for(started.wait(), 20)
        hub = backend.inboxes
        channel = hub._channel
        handling = list(hub._handling)
        assert channel is not None and handling
        closing = asyncio.create_task(hub.close())
        await asyncio.sleep(0.05)  # closing now waits for the handler's clean-up
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert all(task.done() for task in handling), "the handlers ended before the channel closed"
        assert channel.is_closed and hub._channel is None, "the channel was closed"
    finally:
        await bus.close()
    async with Bus.from_url(url) as again, again.inbox(agent, broadcasts=False) as reopened:
        delivery = await reopened.get(20)
        assert (delivery.message.id, delivery.attempt) == (sent.id, 2), "given back by the broker"
        await delivery.ack()


def _slow_to_end() -> asyncio.Task[None]:
    """A task that, once cancelled, takes a while to end (as the source's watchdog finishing a pass)."""

    async def run() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            raise

    return asyncio.create_task(run())


async def test_a_cancelled_source_close_raises_and_still_requeues_what_it_buffered(rabbitmq_url: str) -> None:
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    options = ConsumerOptions(ack_wait=60)
    handling, release = asyncio.Event(), asyncio.Event()
    got: list[tuple[uuid.UUID, int]] = []

    async def hold(delivery: Delivery) -> None:
        handling.set()
        await release.wait()

    async def collect(delivery: Delivery) -> None:
        got.append((delivery.message.id, delivery.attempt))

    async with Bus.from_url(rabbitmq_url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        member = await backend.subscribe(pattern, hold, group=group, options=options)
        source = member.source
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        await asyncio.wait_for(handling.wait(), 20)  # m0 is handled; m1 and m2 wait in the source's buffer
        await eventually(lambda: len(source._buffer) == 2, 20, "m1 and m2 buffered in the source")
        slow = _slow_to_end()
        if source._watchdog is not None:
            source._watchdog.cancel()
        source._watchdog = slow
        channel = source._channel
        closing = asyncio.create_task(source.close())
        await eventually(lambda: source._closed, 5, "the close to wait for the watchdog")
        await asyncio.sleep(0.05)
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert slow.done() and channel is not None and channel.is_closed, "the channel was closed"
        assert source not in backend._subs, "forgotten by the backend"
        other = await backend.subscribe(pattern, collect, group=group, options=options)
        await eventually(lambda: len(got) == 3, 20, "m0..m2 back to the other member")
        assert sorted(got) == sorted((m.id, 2) for m in sent)
        release.set()
        await member.close()
        await other.close()
