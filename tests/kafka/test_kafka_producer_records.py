"""The records the Kafka producer writes: keys, headers and placement (backends/kafka/producer.py, topics.py)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings, topics
from squadbus.backends.kafka._driver import TopicPartition
from squadbus.backends.kafka.ends import groupless_consumer
from squadbus.backends.kafka.partitioner import partition_for
from squadbus.backends.kafka.producer import record_headers, record_key, uuid_bytes
from squadbus.backends.kafka.topics import TopicLayout
from squadbus.core import envelope, subjects
from squadbus.core.bus import Bus
from squadbus.testing.servers.kafka import TansuServer

PARTITIONS = 4


def test_uuid_bytes_is_the_canonical_text() -> None:
    values = [uuid.uuid4() for _ in range(200)] + [envelope.new_id() for _ in range(200)]
    values += [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1), uuid.UUID("12345678-9ABC-DEF0-1234-56789ABCDEF0")]
    for value in values:
        assert uuid_bytes(value) == str(value).encode()


def test_key_and_headers_of_a_record() -> None:
    execution = uuid.uuid4()
    message = envelope.build(subject="agent.message.dev-1", sender_id="pm", recipient_id="dev-1", content="x",
                             task_execution_id=execution, headers={"traceparent": "00-ab-cd-01", "attempt": "2"})
    assert record_key(message) == str(execution).encode()
    assert record_headers(message) == [
        ("squadbus-subject", b"agent.message.dev-1"), ("squadbus-id", str(message.id).encode()),
        ("traceparent", b"00-ab-cd-01"), ("attempt", b"2"),
    ]
    bare = envelope.build(subject="agent.message.broadcast", sender_id="pm", content="x")
    assert record_key(bare) == b"agent.message.broadcast"
    assert record_headers(bare) == [("squadbus-subject", b"agent.message.broadcast"),
                                    ("squadbus-id", str(bare.id).encode())]


@pytest.mark.parametrize("inboxes", [True, False])
@pytest.mark.parametrize("apart", [True, False])
def test_route_agrees_with_topic_for_and_copy_for_when_remembered_or_forgotten(
    inboxes: bool, apart: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(topics, "ROUTES_REMEMBERED", 3)
    layout = TopicLayout(KafkaSettings(topic="m", inboxes=inboxes, broadcasts_apart=apart))
    names = ["agent.message.dev-1", "agent.message.broadcast", "agent.message.domain.dev", "agent.reply.r1",
             "agent.dlq.writer", "agent.message.dev.x", "other.subject", "agent.message.dev-2",
             "agent.message.domain.dev.x"]
    for subject in names + names:  # the second pass is answered from what is remembered, or recomputed
        assert layout.route(subject) == (layout.topic_for(subject), *(layout.copy_for(subject) or (None, None)))
    assert layout.route("agent.message.dev-1") == ("m", "m.inbox", b"dev-1") if inboxes else ("m", None, None)
    for broadcast in ("agent.message.broadcast", "agent.message.domain.dev", "agent.message.domain.dev.x"):
        assert layout.route(broadcast) == (("m", "m.broadcasts", None) if apart else ("m", None, None))
    for other in ("agent.message.dev.x", "other.subject", "agent.reply.r1", "agent.dlq.writer"):
        assert layout.route(other)[1:] == (None, None)


@pytest.mark.kafka
@pytest.mark.parametrize(("batch_bytes", "content"), [(256 * 1024, "m"), (2048, "x" * 600)],
                         ids=["one-batch-per-partition", "batches-fill-while-placing"])
async def test_publish_many_writes_keyed_placed_records_in_order_per_execution(
    tansu: TansuServer, batch_bytes: int, content: str
) -> None:
    url = (f"{tansu.url}?partitions={PARTITIONS}&idempotence=off&topic=t-{uuid.uuid4().hex[:10]}"
           f"&max_batch_bytes={batch_bytes}")
    executions = [uuid.uuid4() for _ in range(3)]
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(url) as bus:
        messages = [
            envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent,
                           content=f"{content}{i}", task_execution_id=executions[i % 3], headers={"attempt": str(i)})
            for i in range(30)
        ]
        await bus.publish_many(messages)
        assert isinstance(bus.backend, KafkaBackend)
        settings = bus.backend.settings
    main = await _read(settings, settings.topic, len(messages))
    assert sorted(r.value for r in main) == sorted(envelope.encode(m) for m in messages)
    by_id = {str(m.id).encode(): m for m in messages}
    for record in main:
        message = by_id[dict(record.headers)["squadbus-id"]]
        assert record.key == str(message.task_execution_id).encode()
        assert record.partition == partition_for(record.key, list(range(PARTITIONS)))
        assert list(record.headers) == record_headers(message)
    for execution in executions:  # publish order per execution, by offset
        ours = sorted((r for r in main if r.key == str(execution).encode()), key=lambda r: r.offset)
        assert [r.value for r in ours] == [envelope.encode(m) for m in messages if m.task_execution_id == execution]
    inbox = await _read(settings, settings.inbox_topic, len(messages))
    assert [r.value for r in sorted(inbox, key=lambda r: r.offset)] == [envelope.encode(m) for m in messages]
    assert {(r.key, r.partition) for r in inbox} == {(agent.encode(), partition_for(agent.encode(),
                                                                                     list(range(PARTITIONS))))}


@pytest.mark.kafka
async def test_broadcasts_get_a_copy_on_the_broadcast_topic_keyed_as_the_main_record(tansu: TansuServer) -> None:
    """Squad and domain broadcasts are written to the main and the broadcast topic, direct messages are not
    (their copy is the inbox topic's), whether published one by one or in a batch."""
    url = f"{tansu.url}?partitions={PARTITIONS}&idempotence=off&topic=t-{uuid.uuid4().hex[:10]}&broadcast_partitions=3"
    execution = uuid.uuid4()
    async with Bus.from_url(url) as bus:
        broadcasts = [
            envelope.build(subject=subjects.BROADCAST, sender_id="pm", content="all hands"),
            envelope.build(subject=subjects.domain("dev"), sender_id="pm-dev", content="dev",
                           task_execution_id=execution),
        ]
        directs = [envelope.build(subject=subjects.direct(f"dev-{i}"), sender_id="pm", recipient_id=f"dev-{i}",
                                  content=str(i), task_execution_id=execution) for i in range(5)]
        await bus.publish_many([directs[0], broadcasts[0], *directs[1:3]])
        for message in (broadcasts[1], *directs[3:]):
            await bus.backend.publish(message)
        assert isinstance(bus.backend, KafkaBackend)
        settings = bus.backend.settings
    main = await _read(settings, settings.topic, 7)
    assert sorted(r.value for r in main) == sorted(envelope.encode(m) for m in broadcasts + directs)
    copies = await _read(settings, settings.broadcast_topic, 2, partitions=settings.broadcast_partitions)
    assert sorted(r.value for r in copies) == sorted(envelope.encode(m) for m in broadcasts)
    for record in copies:
        message = next(m for m in broadcasts if str(m.id).encode() == dict(record.headers)["squadbus-id"])
        assert record.key == record_key(message)
        assert record.partition == partition_for(record.key, list(range(settings.broadcast_partitions)))
    inbox = await _read(settings, settings.inbox_topic, 5)
    assert sorted(r.value for r in inbox) == sorted(envelope.encode(m) for m in directs)


async def _read(settings: KafkaSettings, topic: str, count: int, *, partitions: int = PARTITIONS) -> list[Any]:
    consumer = groupless_consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        async with asyncio.timeout(30):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=200)
                records += [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    return records


@pytest.mark.kafka
async def test_the_broadcast_topic_is_created_with_broadcast_partitions(tansu: TansuServer) -> None:
    """Broadcasts are few, and every partition costs each reading consumer a poll on tansu (4 idle Buses:
    0.163 of a core with 8, 0.065 with 1): the broadcast topic gets ``broadcast_partitions`` (1), the others
    ``partitions``."""
    for extra, wanted in (("", 1), ("&broadcast_partitions=3", 3)):
        url = f"{tansu.url}?partitions={PARTITIONS}&idempotence=off&topic=t-{uuid.uuid4().hex[:10]}{extra}"
        async with Bus.from_url(url) as bus:
            backend = bus.backend
            assert isinstance(backend, KafkaBackend)
            assert len(await backend._publisher.partitions(backend.layout.main)) == PARTITIONS
            assert len(await backend._publisher.partitions(backend.layout.inbox or "")) == PARTITIONS
            assert len(await backend._publisher.partitions(backend.layout.broadcasts or "")) == wanted
            sent = await bus.broadcast("pm", "all hands")
            settings = backend.settings
        copies = await _read(settings, settings.broadcast_topic, 1, partitions=wanted)
        assert [r.value for r in copies] == [envelope.encode(sent)]
