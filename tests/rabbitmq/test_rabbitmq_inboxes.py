"""RabbitMQ inboxes (backends/rabbitmq/inboxes.py): one shared channel per Bus, an agent's queue with a
single active consumer, so a second open of an agent (another process) is a standby that takes over
when the first closes (what it held unsettled comes last: a quorum queue requeues a nack behind) or
dies (first: the broker returns a dead consumer's messages to the head); a nack while open is
redelivered by the hub before the agent's later messages."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.core.bus import Bus
from squadbus.core.errors import ReceiveTimeout

pytestmark = pytest.mark.rabbitmq


async def test_a_second_process_opening_an_agent_waits_then_takes_over(rabbitmq_url: str) -> None:
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as first_bus, Bus.from_url(rabbitmq_url) as second_bus:
        first = await first_bus.inbox(agent, broadcasts=False).open()
        second = await second_bus.inbox(agent, broadcasts=False).open()
        sent = [await first_bus.send("pm", agent, f"m{i}") for i in range(3)]
        held = await first.get(20)
        assert held.message.id == sent[0].id
        with pytest.raises(ReceiveTimeout):
            await second.get(0.5)  # a standby while the first holds the agent
        await first.close()  # gives m0 back unsettled
        got = []
        for _ in sent:
            delivery = await second.get(20)
            got.append((delivery.message.id, delivery.attempt))
            await delivery.ack()
        # The close cancels the consumer (the standby is active from then on) and gives m0 back with
        # basic.nack, which a 3.10 quorum queue requeues behind the ones already queued: m0 comes last,
        # as its second attempt. Known and documented (docs/backends/rabbitmq.md, "Inboxes: order and
        # takeover"): closing the shared channel would return it to the head, but it carries every inbox.
        assert got == [(sent[1].id, 1), (sent[2].id, 1), (sent[0].id, 2)]
        await second.close()


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
        # A quorum queue puts what a dead consumer held back at the head (a nack or a cancelled consumer's
        # give-back goes behind): the order holds, m0 as its second attempt.
        assert got == [(sent[0].id, 2), (sent[1].id, 1), (sent[2].id, 1)]
        await standby.close()
