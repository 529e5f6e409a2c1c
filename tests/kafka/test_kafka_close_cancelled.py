"""A cancelled close of the Kafka inbox hub (backends/kafka/inboxes.py) raises CancelledError in its caller and
still commits and leaves the inbox group, against a real tansu broker."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.inbox_source import INBOX_GROUP_PREFIX
from squadbus.testing.servers.kafka import TansuServer

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def url(tansu: TansuServer) -> str:
    """Topics and an inbox group of this test's own on the session broker."""
    return (f"{tansu.url}?partitions=2&idempotence=off&topic={_uid('t')}&inbox_group={_uid('ib')}"
            "&session_timeout_ms=2000&heartbeat_interval_ms=500")


async def test_a_cancelled_hub_close_raises_and_still_leaves_the_group_uncommitted(url: str) -> None:
    # e.g. asyncio.wait_for(bus.close(), t) timing out while a handler takes time to end: the caller is
    # cancelled (was: the close absorbed it and returned), and the hub still commits and leaves the group.
    agent = _uid("agent")
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
        assert isinstance(backend, KafkaBackend)
        await backend.open_inbox(agent, slow_to_end, group=INBOX_GROUP_PREFIX + agent, options=ConsumerOptions())
        sent = await bus.send("pm", agent, "handled while the hub closes")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        hub = backend._inboxes
        assert hub is not None and hub._consumer is not None
        consumer = hub._consumer
        handling = list(hub._handling)
        assert handling
        closing = asyncio.create_task(hub.close())
        await asyncio.sleep(0.05)  # closing now waits for the handler's clean-up
        assert not closing.done()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert all(task.done() for task in handling), "the handlers ended before the commit"
        assert consumer._closed, "the group member was stopped (it left the group)"
    finally:
        await bus.close()
    async with Bus.from_url(url) as again, again.inbox(agent, broadcasts=False) as reopened:
        delivery = await reopened.get(TIMEOUT)
        assert delivery.message.id == sent.id, "not committed past: read again by the next member"
        await delivery.ack()
