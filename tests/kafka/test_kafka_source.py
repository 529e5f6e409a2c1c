"""KafkaSubscription as a DeliverySource (what core's consumer runtime pulls), against a real tansu broker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka.consumer import KafkaConsumer, KafkaDelivery, KafkaSubscription
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.consumer import Consumer
from squadbus.core.errors import Closed
from squadbus.testing.servers.kafka import TansuServer
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka

WAIT = 20.0


@pytest.fixture
async def backend(tansu: TansuServer) -> AsyncIterator[KafkaBackend]:
    url = f"{tansu.url}?partitions=4&idempotence=off&topic=src-{uuid.uuid4().hex[:10]}&{GROUP_OPTIONS}"
    backend = KafkaBackend(KafkaSettings.from_url(url))
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def _source(backend: KafkaBackend, pattern: str, *, concurrent: bool) -> KafkaSubscription:
    """A source without a group (assigned every partition at its end), no runtime over it."""
    source = KafkaSubscription(
        settings=backend.settings, layout=backend.layout, pattern=pattern, group=None,
        options=ConsumerOptions(), dead_letter=backend.publish, on_close=lambda _: None, concurrent=concurrent,
    )
    await source.start()
    return source


async def _receive(source: KafkaSubscription, count: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < count:
        more = await source.receive(count - len(got), WAIT)
        assert more, f"only {len(got)} of {count} deliveries within {WAIT} s"
        got.extend(more)
    return got


async def test_given_back_records_come_again_first_in_offset_order_with_the_same_attempt(
    backend: KafkaBackend,
) -> None:
    subject = subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")
    source = await _source(backend, subject, concurrent=True)
    try:
        execution = uuid.uuid4()  # one partition: offsets in publish order
        sent = [envelope.build(subject=subject, sender_id="pm", content=f"m{i}", task_execution_id=execution)
                for i in range(4)]
        await backend.publish_many(sent)
        first = await _receive(source, 4)
        assert [d.message.id for d in first] == [m.id for m in sent]
        await first[0].nack()  # a nack with no delay: m0 comes again as attempt 2, before the others
        assert await first[1].ack()
        again = await _receive(source, 1)
        assert (again[0].message.id, again[0].attempt) == (sent[0].id, 2)

        source.give_back([again[0], first[2], first[3]])  # gathered for a batch, never handed to a handler

        back = await _receive(source, 3)
        assert [(d.message.id, d.attempt) for d in back] == [(sent[0].id, 2), (sent[2].id, 1), (sent[3].id, 1)]
        assert isinstance(back[0], KafkaDelivery) and isinstance(first[0], KafkaDelivery)
        assert back[0].offset == first[0].offset
        assert source.poll(10) == ()
    finally:
        await source.close()
    with pytest.raises(Closed):
        await source.receive(1, 0.1)


async def test_subscribe_returns_the_core_runtime_over_the_source(backend: KafkaBackend) -> None:
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        await delivery.ack()

    subject = subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")
    sub = await backend.subscribe(subject, handler, group=None, options=ConsumerOptions())
    assert isinstance(sub, KafkaConsumer) and isinstance(sub, Consumer)
    assert isinstance(sub.source, KafkaSubscription) and sub.kafka_group_id is None
    await sub.close()
    assert sub.source.poll(1) == ()
