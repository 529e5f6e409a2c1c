"""A RabbitMQ subscription is core's consumer runtime over its source (subscriber.py): what the runtime
gives back on close goes back to the queue in order, never handed to the handler, and a source hands
out nothing once stopped."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from squadbus.backends.rabbitmq.subscriber import IncomingMessage, RabbitConsumer, RabbitDelivery, RabbitSubscription
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.rabbitmq

WAIT = 15.0


@pytest.mark.parametrize("profile", ["durable", "fast"])
async def test_a_batch_closed_while_it_fills_goes_back_to_the_group_in_order_unhandled(
    rabbitmq_url: str, profile: str,
) -> None:
    url = rabbitmq_url + ("&profile=fast" if profile == "fast" else "")
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    subject = subjects.direct(agent)
    batches: list[list[Delivery]] = []

    async def handle(batch: Sequence[Delivery]) -> None:
        batches.append(list(batch))

    async with Bus.from_url(url) as first:
        # max_wait 60 s and room for 10: the three are taken and the batch waits for more.
        sub = await first.subscribe_batch(subject, handle, group=group, max_batch=10, max_wait=60.0)
        assert isinstance(sub, RabbitConsumer) and isinstance(sub.source, RabbitSubscription)
        source = sub.source
        handed_out: list[Delivery] = []
        delivery_of = source._delivery_of

        def counted(msg: IncomingMessage) -> RabbitDelivery | None:
            delivery = delivery_of(msg)
            if delivery is not None:
                handed_out.append(delivery)
            return delivery

        source._delivery_of = counted  # type: ignore[method-assign]
        sent = [(await first.send("pm", agent, f"m{i}")).id for i in range(3)]
        await eventually(lambda: len(handed_out) == 3, WAIT, "the batch being gathered")
        await sub.close()
        assert batches == []
        assert source.poll(10) == () and not source._returned and not source._buffer

    got: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        got.append(delivery)

    async with Bus.from_url(url) as second:
        await second.subscribe(subject, collect, group=group, options=ConsumerOptions())
        await eventually(lambda: len(got) == 3, WAIT, "the three given back")
        assert [d.message.id for d in got] == sent
        # Requeued by basic.nack: the queue counts it (quorum), or the broker flags it redelivered (classic).
        assert [d.attempt for d in got] == [2, 2, 2]
