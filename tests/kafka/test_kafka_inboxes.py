"""Kafka inboxes multiplexed per Bus (backends/kafka/inboxes.py, design K2), against a real tansu broker.

Each test uses topics and an inbox group of its own, so records for agents that never open (which hold
their partition's commit floor) do not reach other tests.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka._driver import AIOKafkaAdminClient, ConsumerProtocolMemberMetadata, TopicPartition
from squadbus.backends.kafka.ends import groupless_consumer
from squadbus.backends.kafka.inbox_assignor import InboxAssignor
from squadbus.backends.kafka.partitioner import partition_for
from squadbus.core.backend import ConsumerOptions
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError, ReceiveTimeout
from squadbus.core.placement import InboxPlacement
from squadbus.testing.servers.kafka import TansuServer

pytestmark = pytest.mark.kafka

TIMEOUT = 30.0
PARTITIONS = 4


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def url(tansu: TansuServer) -> str:
    """Topics and an inbox group of this test's own (4 partitions) on the session broker."""
    return (f"{tansu.url}?partitions={PARTITIONS}&idempotence=off&topic={_uid('t')}&inbox_group={_uid('ib')}"
            "&session_timeout_ms=2000&heartbeat_interval_ms=500")  # joins ~1 s on tansu


def _partition(agent: str) -> int:
    return partition_for(agent.encode(), list(range(PARTITIONS)))


def _agents_in(partition: int, count: int) -> list[str]:
    """``count`` fresh agent ids whose inbox partition is ``partition``."""
    found: list[str] = []
    while len(found) < count:
        agent = _uid("agent")
        if _partition(agent) == partition:
            found.append(agent)
    return found


def _backend(bus: Bus) -> KafkaBackend:
    assert isinstance(bus.backend, KafkaBackend)
    return bus.backend


async def test_direct_messages_are_copied_to_the_inbox_topic_keyed_by_recipient(url: str) -> None:
    agent = _uid("agent")
    async with Bus.from_url(url) as bus:
        direct = [await bus.send("pm", agent, f"m{i}", task_execution_id=uuid.uuid4()) for i in range(3)]
        await bus.broadcast("pm", "squad")
        await bus.broadcast("pm", "domain", domain="dev")
        settings = _backend(bus).settings
    consumer = groupless_consumer(settings)
    await consumer.start()
    try:
        tps = [TopicPartition(settings.inbox_topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = []
        for _ in range(20):
            batch = await consumer.getmany(timeout_ms=200)
            records += [r for rs in batch.values() for r in rs]
            if len(records) >= 3:
                break
        await asyncio.sleep(0.3)
        records += [r for rs in (await consumer.getmany(timeout_ms=200)).values() for r in rs]
    finally:
        await consumer.stop()
    assert [r.key for r in records] == [agent.encode()] * 3, "only direct messages, keyed by the recipient"
    assert {r.partition for r in records} == {_partition(agent)}
    assert [r.offset for r in records] == sorted(r.offset for r in records)
    assert [dict(r.headers)["squadbus-id"].decode() for r in records] == [str(m.id) for m in direct]


async def test_a_bus_serves_its_inboxes_with_one_group_member(url: str) -> None:
    agents = [_uid("agent") for _ in range(30)]
    async with Bus.from_url(url) as bus:
        inboxes = [await bus.inbox(a, broadcasts=False).open() for a in agents]
        sent = {m.recipient_id: m.id for m in await asyncio.gather(*(bus.send("pm", a, "hi") for a in agents))}
        got = await asyncio.gather(*(inbox.get(TIMEOUT) for inbox in inboxes))
        assert {d.message.recipient_id: d.message.id for d in got} == sent
        assert _backend(bus).inbox_members == 1
        placement = await bus.inbox_placement()
        assert placement is not None and placement.owned == frozenset(range(PARTITIONS))
        await asyncio.gather(*(inbox.close() for inbox in inboxes))


async def test_an_agent_not_open_holds_its_records_without_blocking_its_partition(url: str) -> None:
    late, busy = _agents_in(0, 2)
    async with Bus.from_url(url) as bus:
        early = await bus.send("pm", late, "sent before the first open")
        async with bus.inbox(busy, broadcasts=False) as inbox:
            for i in range(3):
                sent = await bus.send("pm", busy, f"n{i}")
                delivery = await inbox.get(TIMEOUT)
                assert delivery.message.id == sent.id, "the partition is not held by the agent not open"
                await delivery.ack()
    # A new Bus (the first left the group): the held record was never committed past.
    async with Bus.from_url(url) as bus, bus.inbox(late, broadcasts=False) as inbox:
        delivery = await inbox.get(TIMEOUT)
        assert (delivery.message.id, delivery.attempt) == (early.id, 1)
        await delivery.ack()


async def test_an_agent_opened_later_in_a_running_bus_reads_back_what_waited_for_it(url: str) -> None:
    late, busy = _agents_in(1, 2)
    async with Bus.from_url(url) as bus, bus.inbox(busy, broadcasts=False) as running:
        waited = [await bus.send("pm", late, f"w{i}") for i in range(3)]
        marker = await bus.send("pm", busy, "marker")
        assert (await running.get(TIMEOUT)).message.id == marker.id  # the records for `late` were read
        async with bus.inbox(late, broadcasts=False) as inbox:
            after = await bus.send("pm", late, "after the open")
            got = []
            for _ in range(4):
                delivery = await inbox.get(TIMEOUT)
                got.append(delivery.message.id)
                await delivery.ack()
            assert got == [m.id for m in waited] + [after.id], "in publish order, each once"
            with pytest.raises(ReceiveTimeout):
                await inbox.get(0.3)


async def test_a_nack_holds_that_agent_only(url: str) -> None:
    slow, other = _agents_in(2, 2)
    async with (Bus.from_url(url) as bus, bus.inbox(slow, broadcasts=False) as a,
                bus.inbox(other, broadcasts=False) as b):
        first, second = await bus.send("pm", slow, "1"), await bus.send("pm", slow, "2")
        theirs = await bus.send("pm", other, "x")
        held = await a.get(TIMEOUT)
        assert held.message.id == first.id
        await held.nack(0.5)
        mine = await b.get(TIMEOUT)
        assert mine.message.id == theirs.id, "another agent of the partition goes on during the backoff"
        await mine.ack()
        again = await a.get(TIMEOUT)
        assert (again.message.id, again.attempt) == (first.id, 2), "the nacked one first, before later ones"
        await again.ack()
        assert (await a.get(TIMEOUT)).message.id == second.id


async def test_a_second_open_in_one_bus_waits_for_the_first(url: str) -> None:
    agent = _uid("agent")
    async with Bus.from_url(url) as bus:
        first = await bus.inbox(agent, broadcasts=False).open()
        second = await bus.inbox(agent, broadcasts=False).open()
        one = await bus.send("pm", agent, "1")
        delivery = await first.get(TIMEOUT)
        assert delivery.message.id == one.id
        with pytest.raises(ReceiveTimeout):
            await second.get(0.3)
        await first.close()  # holding it: given back, then served to the second
        again = await second.get(TIMEOUT)
        assert again.message.id == one.id
        await again.ack()
        await second.close()


async def test_hosts_place_agents_by_partition_and_an_unowned_inbox_waits_for_its_partition(url: str) -> None:
    elsewhere = _agents_in(1, 1)[0]
    async with Bus.from_url(f"{url}&inbox_hosts=2&inbox_host=0") as zero:
        one = Bus.from_url(f"{url}&inbox_hosts=2&inbox_host=1")
        await one.start()
        try:
            placements = await asyncio.gather(zero.inbox_placement(), one.inbox_placement())
            for _ in range(int(TIMEOUT * 10)):  # both joined: the next rebalance gives each its slot
                if all(len(p.owned) == 2 for p in placements if isinstance(p, InboxPlacement)):
                    break
                await asyncio.sleep(0.1)
                placements = await asyncio.gather(zero.inbox_placement(), one.inbox_placement())
            assert [p.owned if p else None for p in placements] == [frozenset({0, 2}), frozenset({1, 3})]
            assert placements[0] is not None and not placements[0].owns(elsewhere)
            assert placements[0].owned_agents([elsewhere]) == []
            # Opened where its partition is not owned: it waits (nothing delivered) ...
            async with zero.inbox(elsewhere, broadcasts=False) as inbox:
                sent = await zero.send("pm", elsewhere, "for the host of partition 1")
                with pytest.raises(ReceiveTimeout):
                    await inbox.get(1.0)
                await one.close()  # ... until its owner leaves and the group gives it here
                delivery = await inbox.get(TIMEOUT)
                assert delivery.message.id == sent.id
                await delivery.ack()
        finally:
            await one.close()


async def test_records_unclaimed_past_inbox_unclaimed_ms_are_released(url: str) -> None:
    never, busy = _agents_in(3, 2)
    async with Bus.from_url(f"{url}&inbox_unclaimed_ms=200") as bus, bus.inbox(busy, broadcasts=False) as inbox:
        await bus.send("pm", never, "nobody opens this one")
        last = await bus.send("pm", busy, "done")
        delivery = await inbox.get(TIMEOUT)
        assert delivery.message.id == last.id
        await delivery.ack()
        settings = _backend(bus).settings
        tp = TopicPartition(settings.inbox_topic, 3)
        admin = AIOKafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
        await admin.start()
        try:
            for _ in range(int(TIMEOUT * 10)):
                committed = (await admin.list_consumer_group_offsets(settings.inbox_group, partitions=[tp]))[tp]
                if committed.offset == 2:
                    break
                await asyncio.sleep(0.1)
        finally:
            await admin.close()
        assert committed.offset == 2, "the commit passed the released record and the acked one"


def test_the_inbox_assignor_places_by_slot_and_gives_orphans_to_the_least_loaded() -> None:
    class Cluster:
        @staticmethod
        def partitions_for_topic(topic: str) -> set[int]:
            return set(range(6))

    members = {
        "m-a": ConsumerProtocolMemberMetadata(0, ["t"], b"0/3"),
        "m-b": ConsumerProtocolMemberMetadata(0, ["t"], b"1/3"),
        "m-c": ConsumerProtocolMemberMetadata(0, ["t"], b""),
    }
    given = InboxAssignor(0, 3).assign(Cluster(), members)
    owned = {member: dict(a.assignment).get("t", []) for member, a in given.items()}
    # Slot 2 has no member: its partitions 2 and 5 go to the least loaded (the slotless member).
    assert owned == {"m-a": [0, 3], "m-b": [1, 4], "m-c": [2, 5]}


def test_settings_of_inboxes() -> None:
    s = KafkaSettings.from_url("kafka://h?topic=sq&inbox_hosts=4&inbox_host=3&inboxes=true")
    assert (s.inbox_topic, s.inbox_group, s.inbox_hosts, s.inbox_host) == ("sq.inbox", "sq.inboxes", 4, 3)
    assert KafkaSettings.from_url("kafka://h?inboxes=false&broadcasts_apart=false").topics == (
        "agent-messages", "agent-messages-replies", "agent-messages-dlq")
    for bad in ("inbox_hosts=2&inbox_host=2", "inbox_hosts=-1", "inbox_unclaimed_ms=0", "inbox_topic=agent-messages"):
        with pytest.raises(ConfigError):
            KafkaSettings.from_url(f"kafka://h?{bad}")


async def test_a_delivery_held_by_an_agent_does_not_hold_up_a_rebalance(url: str) -> None:
    held_agent, joining_agent = _agents_in(1, 2)
    options = ConsumerOptions(ack_wait=120)  # the agent may keep it that long; the group must not wait for it
    async with Bus.from_url(f"{url}&inbox_hosts=2&inbox_host=0") as zero, \
            zero.inbox(held_agent, broadcasts=False, options=options) as holding:
        first = await zero.send("pm", held_agent, "kept unsettled")
        kept = await holding.get(TIMEOUT)  # partition 1 is zero's while it is alone in the group
        assert kept.message.id == first.id
        async with Bus.from_url(f"{url}&inbox_hosts=2&inbox_host=1") as one, \
                one.inbox(joining_agent, broadcasts=False) as inbox:
            sent = await one.send("pm", joining_agent, "for the new owner of partition 1")
            delivery = await inbox.get(10.0)  # the join, not ack_wait (was: stuck until ack_wait)
            assert delivery.message.id == sent.id
            await delivery.ack()


async def test_closing_the_backend_under_an_inbox_holding_a_delivery_ends_and_loses_nothing(url: str) -> None:
    agent = _uid("agent")
    bus = await Bus.from_url(url).start()
    try:
        inbox = await bus.inbox(agent, broadcasts=False).open()
        sent = await bus.send("pm", agent, "held while the backend closes")
        held = await inbox.get(TIMEOUT)
        assert held.message.id == sent.id
        await asyncio.wait_for(bus.backend.close(), 10)
    finally:
        await bus.close()
    async with Bus.from_url(url) as again, again.inbox(agent, broadcasts=False) as reopened:
        delivery = await reopened.get(TIMEOUT)
        assert delivery.message.id == sent.id, "not committed past: read again"
        await delivery.ack()
