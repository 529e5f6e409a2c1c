"""Kafka backend behaviour beyond the conformance suite, against real tansu brokers.

Each test that writes unusual records uses its own topics (``topic=<unique>``)
so nothing leaks into other tests' groups.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from squadbus.backends.kafka import Idempotence, KafkaBackend, KafkaDelivery, KafkaSettings
from squadbus.backends.kafka.replay import partition_of
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_GROUP, DLQ_REASON
from squadbus.core.errors import BackendError, ConfigError, ConnectionLost, Retry
from squadbus.testing.conformance import Collector, eventually
from squadbus.testing.servers.kafka import TansuServer
from squadbus.testing.servers.process import free_port, kill9, spawn, stop
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0
CHILD = Path(__file__).with_name("consumer_child.py")


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def topic_url(tansu: TansuServer) -> str:
    """A URL with topics of its own (4 partitions) on the session broker."""
    return f"{tansu.url}?partitions=4&idempotence=off&topic={_uid('t')}&{GROUP_OPTIONS}"


async def test_two_members_split_a_four_partition_topic(topic_url: str) -> None:
    agent, group = _uid("agent"), _uid("workers")
    async with Bus.from_url(topic_url) as one, Bus.from_url(topic_url) as two:
        got: dict[str, list[KafkaDelivery]] = {"one": [], "two": []}

        def member(name: str) -> Callable[[Delivery], Awaitable[None]]:
            async def handler(delivery: Delivery) -> None:
                assert isinstance(delivery, KafkaDelivery)
                got[name].append(delivery)
                await asyncio.sleep(0.002)

            return handler

        await one.subscribe(subjects.direct(agent), member("one"), group=group)
        await two.subscribe(subjects.direct(agent), member("two"), group=group)
        sent = {(await one.send("pm", agent, f"job-{i}", task_execution_id=uuid.uuid4())).id for i in range(200)}
        await eventually(
            lambda: {d.message.id for d in got["one"] + got["two"]} >= sent, TIMEOUT, "the group to get everything"
        )
        await asyncio.sleep(0.5)
        counts = Counter(d.message.id for d in got["one"] + got["two"])
        assert set(counts) == sent and max(counts.values()) == 1
        parts_one = {d.offset[1] for d in got["one"]}
        parts_two = {d.offset[1] for d in got["two"]}
        assert parts_one and parts_two, "both members should own partitions"
        assert not parts_one & parts_two, "a partition is read by one member of a group"
        assert parts_one | parts_two == {0, 1, 2, 3}


async def test_consumer_killed_mid_batch_loses_nothing(topic_url: str, tmp_path: Path) -> None:
    agent, group = _uid("agent"), _uid("writers")
    out = tmp_path / "child.txt"
    out.touch()
    async with Bus.from_url(topic_url) as bus:
        sent = [(await bus.send("pm", agent, f"row-{i}")).id for i in range(100)]
        child = spawn([sys.executable, str(CHILD), topic_url, agent, group, str(out), "3"], tmp_path / "child.log")
        try:
            def batches() -> dict[int, set[uuid.UUID]]:
                found: dict[int, set[uuid.UUID]] = {}
                for line in out.read_text().splitlines():
                    number, message_id = line.split()
                    found.setdefault(int(number), set()).add(uuid.UUID(message_id))
                return found

            await eventually(lambda: 3 in batches() or child.poll() is not None, TIMEOUT, "the child's third batch")
            assert child.poll() is None, (tmp_path / "child.log").read_text()
            kill9(child)
        finally:
            stop(child)
        seen = batches()
        hung = seen[3]
        done = seen[1] | seen[2]
        survivor = Collector()
        await bus.subscribe(subjects.direct(agent), survivor, group=group)
        await eventually(lambda: set(survivor.ids) | done >= set(sent), TIMEOUT * 2, "every message processed")
        assert hung <= set(survivor.ids), "offsets of the batch in progress were not committed and are re-read"


async def test_malformed_record_goes_to_the_dlq_and_does_not_block(topic_url: str) -> None:
    from aiokafka import AIOKafkaProducer

    settings = KafkaSettings.from_url(topic_url)
    agent, group = _uid("agent"), _uid("g")
    subject = subjects.direct(agent)
    async with Bus.from_url(topic_url) as bus:
        dlq, got = Collector(), Collector()
        await bus.subscribe(subjects.dead_letter(group), dlq, group=_uid("dlq"))
        await bus.subscribe(subject, got, group=group)
        raw = AIOKafkaProducer(bootstrap_servers=list(settings.bootstrap_servers))
        await raw.start()
        try:
            # Same key as the agent's messages: same partition, before a valid message.
            await raw.send_and_wait(settings.topic, b"\xff not json {", key=subject.encode())
            await raw.send_and_wait(settings.topic, b'{"id": "nope"}', key=subject.encode(),
                                    headers=[("squadbus-subject", subject.encode())])
        finally:
            await raw.stop()
        after = await bus.send("pm", agent, "valid, after the garbage")
        await eventually(lambda: after.id in got.ids, TIMEOUT, "the valid message behind the garbage")
        await eventually(lambda: len(dlq.messages) >= 2, TIMEOUT, "two dead letters")
        assert got.ids == [after.id]
        for dead in dlq.messages:
            assert dead.headers[DLQ_GROUP] == group
            assert dead.headers[DLQ_REASON].startswith("malformed record: not a valid squadbus envelope")
            assert dead.metadata["kafka"]["topic"] == settings.topic
        assert dlq.messages[0].content.endswith("not json {")
        assert dlq.messages[0].metadata["kafka"]["offset"] < dlq.messages[1].metadata["kafka"]["offset"]


async def test_a_retry_holds_only_its_partition_and_keeps_execution_order(topic_url: str) -> None:
    agent, group = _uid("agent"), _uid("g")
    async with Bus.from_url(topic_url) as bus:
        partitions = list(range(4))
        slow = uuid.uuid4()
        fast = next(e for e in iter(uuid.uuid4, None) if partition_of(str(e).encode(), partitions)
                    != partition_of(str(slow).encode(), partitions))
        events: list[tuple[str, int]] = []

        async def handler(delivery: Delivery) -> None:
            events.append((delivery.message.content, delivery.attempt))
            if delivery.message.content == "slow-1" and delivery.attempt == 1:
                raise Retry(delay=2.0)

        await bus.subscribe(subjects.direct(agent), handler, group=group, options=ConsumerOptions(ack_wait=10))
        await bus.send("pm", agent, "slow-1", task_execution_id=slow)
        await bus.send("pm", agent, "slow-2", task_execution_id=slow)
        await eventually(lambda: ("slow-1", 1) in events, TIMEOUT, "the first attempt")
        await bus.send("pm", agent, "fast", task_execution_id=fast)
        await eventually(lambda: ("slow-2", 1) in events, TIMEOUT, "the held partition to move on")
        assert events.index(("fast", 1)) < events.index(("slow-1", 2)), "another partition was held too"
        assert events.index(("slow-1", 2)) < events.index(("slow-2", 1)), "order within the execution broken"


async def test_publish_with_broker_down_raises_a_backend_error() -> None:
    with TansuServer() as server:
        bus = await Bus.from_url(f"{server.url}?idempotence=off&publish_timeout=3&partitions=1").start()
        try:
            await bus.send("pm", "dev-1", "while the broker is up")
            assert server.proc is not None
            kill9(server.proc)
            with pytest.raises(BackendError):
                async with asyncio.timeout(3 + 10):  # the guard only turns a hang into a failure
                    await bus.send("pm", "dev-1", "while the broker is down")
            # Many at once (batched together by the publisher): each one fails, none hangs.
            async with asyncio.timeout(3 + 10):
                outcomes = await asyncio.gather(
                    *(bus.send("pm", "dev-1", f"down-{i}", task_execution_id=uuid.uuid4()) for i in range(50)),
                    return_exceptions=True,
                )
            assert all(isinstance(outcome, BackendError) for outcome in outcomes), outcomes
        finally:
            await bus.close()


async def test_connect_to_nothing_raises_connection_lost() -> None:
    backend = KafkaBackend(KafkaSettings.from_url(f"kafka://127.0.0.1:{free_port()}?connect_timeout=3"))
    with pytest.raises((ConnectionLost, BackendError)):
        await backend.connect()
    await backend.close()


async def test_idempotence_auto_falls_back_on_tansu_and_on_refuses(tansu: TansuServer) -> None:
    auto = KafkaBackend(KafkaSettings.from_url(f"{tansu.url}?idempotence=auto&partitions=4"))
    await auto.connect()
    try:
        assert auto.settings.idempotence is Idempotence.AUTO
        assert auto.idempotent is False, "tansu 0.6 refuses InitProducerId"
        async with Bus(auto, owns_backend=False) as bus:
            await bus.send("pm", "dev-1", "published without idempotence")
    finally:
        await auto.close()
    strict = KafkaBackend(KafkaSettings.from_url(f"{tansu.url}?idempotence=on&partitions=4"))
    with pytest.raises(ConfigError, match="idempotent"):
        await strict.connect()
    await strict.close()


async def test_publish_many_in_many_small_batches_keeps_order_and_placement(topic_url: str) -> None:
    """publish_many builds per-partition batches itself: with batches of ~3 records, 240 messages of
    six executions arrive once each, in order per execution, on the partition publish() uses."""
    agent, group = _uid("agent"), _uid("many")
    async with Bus.from_url(f"{topic_url}&max_batch_bytes=4096") as bus:
        got: list[KafkaDelivery] = []

        async def handler(delivery: Delivery) -> None:
            assert isinstance(delivery, KafkaDelivery)
            got.append(delivery)

        await bus.subscribe(subjects.direct(agent), handler, group=group)
        executions = [uuid.uuid4() for _ in range(6)]
        single = {x: await bus.send("pm", agent, "first", task_execution_id=x) for x in executions}
        messages = [
            envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent,
                           content=f"{i // 6}:" + "x" * 1000, task_execution_id=executions[i % 6])
            for i in range(240)
        ]
        await bus.publish_many(messages)
        await eventually(lambda: len(got) >= 246, TIMEOUT, "every message to arrive")
        await asyncio.sleep(0.3)
        assert len(got) == 246 and len({d.message.id for d in got}) == 246
        for execution in executions:
            mine = [d for d in got if d.message.task_execution_id == execution]
            assert [d.message.content.split(":")[0] for d in mine] == ["first", *(str(n) for n in range(40))]
            assert {d.offset[1] for d in mine} == {partition_of(str(execution).encode(), [0, 1, 2, 3])}
            assert mine[0].message.id == single[execution].id
