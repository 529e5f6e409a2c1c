"""Agents' inboxes on the memory backend (``backends/memory/inboxes.py``): no task while idle, one open
served at a time, a later open takes over. Counts and outcomes, no timings."""

from __future__ import annotations

import asyncio

from squadbus.backends.memory import MemoryBackend
from squadbus.core.backend import ConsumerOptions
from squadbus.core.bus import Bus
from squadbus.core.errors import ReceiveTimeout
from squadbus.core.inbox import Inbox
from squadbus.core.inbox_source import MultiplexesInboxes

WAIT = 5.0


async def test_idle_inboxes_hold_no_task() -> None:
    backend = MemoryBackend()
    assert isinstance(backend, MultiplexesInboxes)
    async with Bus(backend) as bus:
        await bus.inbox("pm", broadcasts=False).open()  # what a Bus pays once
        baseline = len(asyncio.all_tasks())
        inboxes = [await bus.inbox(f"dev-{n}", broadcasts=False).open() for n in range(50)]
        assert len(asyncio.all_tasks()) == baseline
        for n in range(50):
            await bus.send("pm", f"dev-{n}", f"to {n}")
        # A delivery being handed over is a task until it is settled; none remains once all are acked.
        for n, inbox in enumerate(inboxes):
            delivery = await inbox.get(WAIT)
            assert delivery.message.content == f"to {n}"
            await delivery.ack()
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(asyncio.all_tasks()) == baseline


async def test_one_agent_gets_its_messages_one_at_a_time_in_order() -> None:
    async with Bus(MemoryBackend()) as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        for n in range(200):  # past the fairness streak of the hand-over
            await bus.send("pm", "dev-1", str(n))
        got = []
        for _ in range(200):
            delivery = await inbox.get(WAIT)
            got.append(int(delivery.message.content))
            assert inbox._queue.qsize() == 0, "a second delivery was handed over before the first was settled"
            await delivery.ack()
        assert got == list(range(200))


async def test_a_second_open_waits_for_the_first_to_close_then_takes_over() -> None:
    options = ConsumerOptions(backoff_base=0.01, backoff_max=0.01)
    backend = MemoryBackend()
    async with Bus(backend, consumer_options=options) as one, Bus(backend, owns_backend=False,
                                                                   consumer_options=options) as two:
        first = await one.inbox("dev-1", broadcasts=False).open()
        second = await two.inbox("dev-1", broadcasts=False).open()
        await one.send("pm", "dev-1", "a")
        await one.send("pm", "dev-1", "b")
        held = await first.get(WAIT)
        assert held.message.content == "a"
        try:
            await second.get(0.2)
            raise AssertionError("the second open got a message while the first was open")
        except ReceiveTimeout:
            pass
        await first.close()  # gives 'a' back unsettled (after its nack's short backoff)
        got = {}
        for _ in range(2):
            delivery = await second.get(WAIT)
            got[delivery.message.content] = delivery.attempt
            await delivery.ack()
        # 'b' may have been handed to the closing inbox and given back too (attempt 2), as on any backend.
        assert got.keys() == {"a", "b"} and got["a"] == 2
        assert [p.agent_id for p in await backend.open_inboxes()] == ["dev-1"]
        await second.close()
        assert await backend.open_inboxes() == []


async def test_closing_the_backend_closes_inboxes_with_a_delivery_out() -> None:
    backend = MemoryBackend()
    bus = await Bus(backend).start()
    inbox: Inbox = await bus.inbox("dev-1", broadcasts=False).open()
    await bus.send("pm", "dev-1", "held")
    delivery = await inbox.get(WAIT)
    await asyncio.wait_for(bus.close(), WAIT)  # nacks what the agent holds, then closes the member
    assert delivery.settled == "nack"
    assert not inbox.is_open
