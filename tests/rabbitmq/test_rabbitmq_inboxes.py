"""RabbitMQ inboxes (backends/rabbitmq/inboxes.py): a fixed set of partition queues per squad with a single
active consumer, one shared channel per Bus; a Bus holds messages for agents not open on it until they
open; another Bus reading the same partitions is a standby that takes over, in order, when the first
closes or dies (the broker returns unacknowledged messages to the head); a nack while open is
redelivered by the hub before the agent's later messages; placed hosts read only their partitions."""

from __future__ import annotations

import asyncio
import sys
import uuid
import zlib

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.backends.rabbitmq.placement import host_of, host_url
from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ReceiveTimeout
from squadbus.testing.servers.rabbitmq import RabbitServer

pytestmark = pytest.mark.rabbitmq


def _queues(server: RabbitServer, namespace: str) -> list[str]:
    listing = server.ctl("list_queues", "name", "--quiet")
    return sorted(line.strip() for line in listing.splitlines()[1:] if line.strip().startswith(f"{namespace}."))


async def test_broker_queues_and_consumers_do_not_grow_with_agents(rabbitmq_server: RabbitServer,
                                                                   rabbitmq_url: str) -> None:
    namespace = RabbitSettings.from_url(rabbitmq_url).namespace
    url = f"{rabbitmq_url}&inbox_partitions=4"
    async with Bus.from_url(url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        seen = []
        for count in (5, 60):
            inboxes = [bus.inbox(f"a{i}-{uuid.uuid4().hex[:6]}", broadcasts=False) for i in range(count)]
            await asyncio.gather(*(inbox.open() for inbox in inboxes))
            sent = await asyncio.gather(*(bus.send("pm", inbox.agent_id, "hi") for inbox in inboxes))
            got = await asyncio.gather(*(inbox.get(20) for inbox in inboxes))
            assert [d.message.id for d in got] == [m.id for m in sent]
            await asyncio.gather(*(d.ack() for d in got))
            queues = await asyncio.to_thread(_queues, rabbitmq_server, namespace)
            seen.append(([q for q in queues if ".inbox" in q], backend.inboxes.consumers))
            await asyncio.gather(*(inbox.close() for inbox in inboxes))
    partitions = [f"{namespace}.inboxes.{p}" for p in range(4)]
    assert [queues for queues, _ in seen] == [partitions, partitions], "a queue per partition, none per agent"
    assert seen[0][1] <= 4 and seen[1][1] == 4, "a consumer per partition read (those of the agents opened)"


async def test_a_second_bus_opening_an_agent_waits_then_takes_over_in_order(rabbitmq_url: str) -> None:
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as second_bus:
        first_bus = await Bus.from_url(rabbitmq_url).start()
        try:
            first = await first_bus.inbox(agent, broadcasts=False).open()
            second = await second_bus.inbox(agent, broadcasts=False).open()
            sent = [await first_bus.send("pm", agent, f"m{i}") for i in range(3)]
            held = await first.get(20)
            assert held.message.id == sent[0].id
            with pytest.raises(ReceiveTimeout):
                await second.get(0.5)  # its partition is read by the first Bus: a standby
        finally:
            await first_bus.close()  # its channel closes: m0..m2 go back to the head of the partition
        got = []
        for _ in sent:
            delivery = await second.get(20)
            got.append((delivery.message.id, delivery.attempt))
            await delivery.ack()
        # m0 was handed out and given back, m1 and m2 were held for the agent: each comes back once more.
        assert got == [(sent[0].id, 2), (sent[1].id, 2), (sent[2].id, 2)]


async def test_messages_wait_for_an_agent_opened_later_in_order_then_are_released(rabbitmq_url: str) -> None:
    url = f"{rabbitmq_url}&inbox_partitions=1&inbox_unclaimed=0.5"
    opened, late, never = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("opened", "late", "never"))
    async with Bus.from_url(url) as bus:
        first = await bus.inbox(opened, broadcasts=False).open()  # this Bus reads the partition from now on
        to_late = [await bus.send("pm", late, f"m{i}") for i in range(3)]
        await bus.send("pm", never, "nobody opens me")
        marker = await bus.send("pm", opened, "after them")
        assert (await first.get(20)).message.id == marker.id  # the others are held, not blocking
        async with bus.inbox(late, broadcasts=False) as inbox:
            got = []
            for _ in to_late:
                delivery = await inbox.get(20)
                got.append(delivery.message.id)
                await delivery.ack()
            assert got == [m.id for m in to_late]
        await asyncio.sleep(1.5)  # past inbox_unclaimed: the one for "never" is acked undelivered
        await first.close()
    async with Bus.from_url(url) as bus, bus.inbox(never, broadcasts=False) as inbox:
        with pytest.raises(ReceiveTimeout):
            await inbox.get(0.5)


async def test_a_partition_full_of_messages_for_agents_not_open_waits_for_them(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # inbox_prefetch bounds what a Bus holds per partition: 3 messages for an agent not open fill it,
    # so the broker hands that partition nothing more until the agent opens; then everything flows, in order.
    url = f"{rabbitmq_url}&inbox_partitions=1&inbox_prefetch=3"
    absent, present = f"absent-{uuid.uuid4().hex[:6]}", f"present-{uuid.uuid4().hex[:6]}"
    async with Bus.from_url(url) as bus:
        inbox = await bus.inbox(present, broadcasts=False).open()
        held = [await bus.send("pm", absent, f"m{i}") for i in range(4)]
        later = await bus.send("pm", present, "behind the full prefetch")
        with pytest.raises(ReceiveTimeout):
            await inbox.get(0.5)
        assert any("wait for agents not open" in r.getMessage() for r in caplog.records), "the stall is logged"
        async with bus.inbox(absent, broadcasts=False) as opened:
            got = []
            for _ in held:
                delivery = await opened.get(20)
                got.append(delivery.message.id)
                await delivery.ack()
        assert got == [m.id for m in held]
        assert (await inbox.get(20)).message.id == later.id
        await inbox.close()


@pytest.mark.parametrize("where", ["this bus", "another bus"])
async def test_direct_messages_of_an_agent_read_by_a_group_do_not_fill_a_partition(
    rabbitmq_url: str, where: str
) -> None:
    # An agent that takes its direct messages through a group subscription (not an inbox) gets them from its
    # group queue; the partition's copies must not be held for an inbox that never opens (3 of them filled
    # the partition and stalled the inboxes sharing it until inbox_unclaimed, an hour by default).
    url = f"{rabbitmq_url}&inbox_partitions=1&inbox_prefetch=3"
    worker, present = f"worker-{uuid.uuid4().hex[:6]}", f"present-{uuid.uuid4().hex[:6]}"
    got: list[object] = []

    async def handle(delivery: Delivery) -> None:
        got.append(delivery.message.id)

    async with Bus.from_url(url) as bus, Bus.from_url(url) as other:
        subscriber = bus if where == "this bus" else other
        await subscriber.subscribe(subjects.direct(worker), handle, group="workers")
        inbox = await bus.inbox(present, broadcasts=False).open()
        sent = [await bus.send("pm", worker, f"job {i}") for i in range(6)]
        later = await bus.send("pm", present, "not behind the worker's jobs")
        assert (await inbox.get(20)).message.id == later.id
        for _ in range(200):
            if len(got) == len(sent):
                break
            await asyncio.sleep(0.05)
        assert got == [m.id for m in sent]
        await inbox.close()


async def test_what_no_bus_reads_expires_with_the_log_retention(rabbitmq_server: RabbitServer,
                                                                rabbitmq_url: str) -> None:
    url = f"{rabbitmq_url}&inbox_partitions=1&log_max_age=1"
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(url) as bus, bus.inbox(f"{agent}-first", broadcasts=False):
        pass  # creates the partition queue; nobody reads it after this Bus closed
    namespace = RabbitSettings.from_url(url).namespace
    listing = await asyncio.to_thread(rabbitmq_server.ctl, "list_queues", "name", "arguments", "--quiet")
    [row] = [line for line in listing.splitlines() if line.startswith(f"{namespace}.inboxes.0")]
    assert "x-message-ttl" in row and "1000" in row
    async with Bus.from_url(url) as bus:
        await bus.send("pm", agent, "expires before anyone reads it")
        await asyncio.sleep(1.5)
        async with bus.inbox(agent, broadcasts=False) as inbox:
            with pytest.raises(ReceiveTimeout):
                await inbox.get(0.5)


async def test_unplaced_buses_read_the_partitions_of_the_agents_they_open(rabbitmq_url: str) -> None:
    url = f"{rabbitmq_url}&inbox_partitions=4"
    agents = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    # crc32(agent) % 2 (how squadbus simulate places agents): 2 divides 4, so the two Buses read disjoint partitions.
    placed = [[a for a in agents if zlib.crc32(a.encode()) % 2 == i] for i in range(2)]
    async with Bus.from_url(url) as zero, Bus.from_url(url) as one:
        inboxes = [[await bus.inbox(a, broadcasts=False).open() for a in mine]
                   for bus, mine in ((zero, placed[0]), (one, placed[1]))]
        sent = await asyncio.gather(*(zero.send("pm", a, "hi") for a in agents))
        by_agent = {m.recipient_id: m.id for m in sent}
        for host in (0, 1):
            for agent, inbox in zip(placed[host], inboxes[host], strict=True):
                delivery = await inbox.get(20)
                assert delivery.message.id == by_agent[agent]
                await delivery.ack()


async def test_placed_hosts_read_only_their_partitions(rabbitmq_url: str) -> None:
    urls = [host_url(f"{rabbitmq_url}&inbox_partitions=4", i, 2) for i in range(2)]
    agents = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    async with Bus.from_url(urls[0]) as zero, Bus.from_url(urls[1]) as one:
        placements = [await zero.inbox_placement(), await one.inbox_placement()]
        assert [p.owned if p else None for p in placements] == [frozenset({0, 2}), frozenset({1, 3})]
        mine = [[a for a in agents if host_of(urls[0], a, 2) == i] for i in range(2)]
        assert all(mine) and [placements[i].owned_agents(agents) for i in range(2) if placements[i]] == mine
        # Each host opens every agent (as if placement were ignored): only the owner gets the message.
        inboxes = [[await bus.inbox(a, broadcasts=False).open() for a in agents] for bus in (zero, one)]
        await asyncio.gather(*(zero.send("pm", a, "hi") for a in agents))
        for host in (0, 1):
            for agent, inbox in zip(agents, inboxes[host], strict=True):
                if agent in mine[host]:
                    await (await inbox.get(20)).ack()
                else:
                    with pytest.raises(ReceiveTimeout):
                        await inbox.get(0.05)


async def test_inboxes_share_one_channel_of_the_bus(rabbitmq_url: str) -> None:
    async with Bus.from_url(rabbitmq_url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        connection = backend.connection.transport.connection  # type: ignore[union-attr]
        before = len(connection.channels)
        inboxes = [await bus.inbox(f"a{i}-{uuid.uuid4().hex[:6]}", broadcasts=False).open() for i in range(10)]
        assert len(connection.channels) - before == 1
        sent = await asyncio.gather(*(bus.send("pm", inbox.agent_id, "hi") for inbox in inboxes))
        for inbox, message in zip(inboxes, sent, strict=True):
            delivery = await inbox.get(20)
            assert delivery.message.id == message.id
            await delivery.ack()
            await inbox.close()


async def test_nack_comes_back_with_attempt_plus_one_before_later_messages(rabbitmq_url: str) -> None:
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        async with bus.inbox(agent, broadcasts=False) as inbox:
            got: list[tuple[uuid.UUID, int]] = []
            for _ in range(5):
                delivery = await inbox.get(20)
                got.append((delivery.message.id, delivery.attempt))
                if delivery.message.id == sent[0].id and delivery.attempt < 3:
                    await delivery.nack(0.1)
                else:
                    await delivery.ack()
    assert got == [(sent[0].id, 1), (sent[0].id, 2), (sent[0].id, 3), (sent[1].id, 1), (sent[2].id, 1)]


_HOLDER = """
import asyncio, sys
from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus

async def main() -> None:
    bus = Bus.from_url(sys.argv[1])
    await bus.start()
    inbox = await bus.inbox(sys.argv[2], broadcasts=False).open()
    delivery = await inbox.get(20)
    print(delivery.message.id, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_standby_takes_over_from_a_killed_holder_with_its_delivery_first(rabbitmq_url: str) -> None:
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus:
        sent = [await bus.send("pm", agent, f"m{i}") for i in range(3)]
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _HOLDER, rabbitmq_url, agent, stdout=asyncio.subprocess.PIPE)
        try:
            assert holder.stdout is not None
            line = await asyncio.wait_for(holder.stdout.readline(), 30)
            assert line.decode().strip() == str(sent[0].id)
            standby = await bus.inbox(agent, broadcasts=False).open()
            with pytest.raises(ReceiveTimeout):
                await standby.get(0.3)
            holder.kill()  # kill -9: the broker returns m0 with the connection
        finally:
            if holder.returncode is None:
                holder.kill()
            await holder.wait()
        got = []
        for _ in sent:
            delivery = await standby.get(20)
            got.append((delivery.message.id, delivery.attempt))
            await delivery.ack()
        # A quorum queue puts what a dead consumer held back at the head, in order: m0 (handed out) and
        # m1, m2 (prefetched by the dead Bus for the agent) come back, each as its second delivery.
        assert got == [(sent[0].id, 2), (sent[1].id, 2), (sent[2].id, 2)]
        await standby.close()
