"""A Redis subscription is core's consumer runtime over a group member's source (consumer.py, group.py):
what the runtime gives back on close goes back to the group as never delivered, in order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from squadbus.backends.redis import RedisBackend
from squadbus.backends.redis.consumer import RedisSubscription
from squadbus.backends.redis.group import GroupSource
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.redis

WAIT = 15.0


async def test_a_batch_closed_while_it_fills_goes_back_to_the_group_in_order_as_never_delivered(
    redis_url: str,
) -> None:
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    subject = subjects.direct(agent)
    execution = uuid.uuid4()
    batches: list[list[Delivery]] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        batches.append(list(batch))

    async with Bus.from_url(redis_url) as first:
        backend = first.backend
        assert isinstance(backend, RedisBackend)
        sent = [(await first.send("pm", agent, f"m{i}", task_execution_id=execution)).id for i in range(3)]
        # max_wait 60 s and room for 10: the three are taken and the batch waits for more.
        sub = await first.subscribe_batch(subject, handle, group=group, max_batch=10, max_wait=60.0,
                                          options=ConsumerOptions(ack_wait=1.0))
        assert isinstance(sub, RedisSubscription) and isinstance(sub.source, GroupSource)
        await eventually(lambda: backend.stats()["delivered"] == 3, WAIT, "the batch being gathered")
        await sub.close()
        assert batches == []
        assert backend.stats()["delivered"] == 0, "given back, not delivered"

    got: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        got.append(delivery)

    async with Bus.from_url(redis_url) as second:
        await second.subscribe(subject, collect, group=group, options=ConsumerOptions(ack_wait=1.0))
        await eventually(lambda: len(got) == 3, WAIT, "the three given back")
        assert [d.message.id for d in got] == sent
        assert [d.attempt for d in got] == [1, 1, 1]
