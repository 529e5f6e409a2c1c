"""Reading up to "the end" of a partition after batched publishes, on a real tansu broker.

tansu 0.6 answers ListOffsets(latest) with the base offset of the partition's last record
batch + 1, not the high watermark, so after a ``publish_many`` every use of "the end"
(replay's stop, an ephemeral subscription's start, a ``StartFrom.NEW`` group's start) must
take the real end from a fetch (:mod:`squadbus.backends.kafka.ends`).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka._driver import AIOKafkaConsumer, TopicPartition
from squadbus.backends.kafka.ends import high_watermarks
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.conformance import Collector, eventually
from squadbus.testing.servers.kafka import TansuServer
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic_url(tansu: TansuServer) -> str:
    """A URL with topics of its own (4 partitions) on the session broker."""
    return f"{tansu.url}?partitions=4&idempotence=off&topic={_uid('t')}&{GROUP_OPTIONS}"


def _interleaved(execution: uuid.UUID, count: int, others: int) -> tuple[list[Message], list[Message]]:
    """``count`` messages of ``execution``, each followed by one of ``others`` other executions."""
    agent = _uid("agent")
    extra = [uuid.uuid4() for _ in range(others)]
    mine: list[Message] = []
    every: list[Message] = []
    for i in range(count):
        m = envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent,
                           content=f"m{i}", task_execution_id=execution)
        mine.append(m)
        every.append(m)
        every.append(envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent,
                                    content=f"o{i}", task_execution_id=extra[i % others]))
    return mine, every


async def test_replay_after_batched_publishes_returns_every_message_in_order(topic_url: str) -> None:
    execution = uuid.uuid4()
    mine, every = _interleaved(execution, 500, others=7)
    async with Bus.from_url(topic_url) as bus:
        for start in range(0, len(every), 250):
            await bus.publish_many(every[start:start + 250])
        replayed = [m.id async for _, m in bus.replay(execution)]
        assert len(replayed) == len(mine)
        assert replayed == [m.id for m in mine]
        since = [m.id async for _, m in bus.replay(execution, since=mine[100].created_at)]
        assert since == [m.id for m in mine[100:]]


async def test_high_watermarks_are_the_real_ends_after_a_batch(topic_url: str, tansu: TansuServer) -> None:
    backend = KafkaBackend(KafkaSettings.from_url(topic_url))
    await backend.connect()
    consumer = AIOKafkaConsumer(bootstrap_servers=[tansu.bootstrap], group_id=None, enable_auto_commit=False)
    try:
        _, every = _interleaved(uuid.uuid4(), 300, others=5)
        await backend.publish_many(every)
        await consumer.start()
        topic = backend.layout.main
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        ends = await high_watermarks(consumer, tps)
        assert sum(ends.values()) == len(every)
        counted = dict.fromkeys(tps, 0)
        for tp in tps:
            consumer.seek(tp, 0)
        while sum(counted.values()) < len(every):
            for tp, records in (await consumer.getmany(*tps, timeout_ms=1000)).items():
                counted[tp] += len(records)
        assert counted == ends
    finally:
        await consumer.stop()
        await backend.close()


@pytest.mark.parametrize("group", [None, "named"])
async def test_subscription_from_the_end_skips_everything_published_before(topic_url: str, group: str | None) -> None:
    _, every = _interleaved(uuid.uuid4(), 200, others=3)
    agent = every[0].recipient_id
    assert agent is not None
    async with Bus.from_url(topic_url) as bus:
        await bus.publish_many(every)
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=None if group is None else _uid(group),
                            options=ConsumerOptions(start=StartFrom.NEW))
        fresh = await bus.send("pm", agent, "new")
        await eventually(lambda: fresh.id in got.ids, TIMEOUT, "the new message")
        await asyncio.sleep(0.3)
        assert [m.content for m in got.messages] == ["new"]
