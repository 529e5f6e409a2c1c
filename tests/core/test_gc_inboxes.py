"""What a waiting agent leaves for Python's collector to scan, and the waiting that makes it small.

Counts, not timings (issue 15: at 10,000 agents every object a waiting agent holds is scanned by each
full collection). ``async for delivery in inbox`` waits through the inbox's own awaitable, which is
also the future its task waits on (``core.inbox._NextDelivery``): no coroutine, future or future
iterator per wait. These tests check what that costs and that it waits as a coroutine would:
cancelled, closed, two loops on one inbox, wrapped by asyncio (wait_for, ensure_future), traced.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections import Counter

import pytest

from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message, new_id, utcnow
from squadbus.core.inbox import Inbox

WAIT = 5.0
AGENTS = 200


def tracked() -> Counter[str]:
    """Objects the collector tracks outside the frozen set, by type."""
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def test_a_waiting_agent_leaves_a_future_and_no_coroutine_for_the_collector() -> None:
    # retain_messages=0: the replay window keeps each message's UUIDs on purpose (bounded by its size).
    async with Bus(MemoryBackend(MemorySettings(retain_messages=0))) as bus:
        async def history(delivery: Delivery) -> None:
            pass

        await bus.subscribe("agent.>", history, group="db-writer")  # every message, as the db-writer reads
        inboxes = [await bus.inbox(f"dev-{n}", domains=("dev",)).open() for n in range(AGENTS)]
        handled = 0

        async def serve(inbox: Inbox) -> None:
            nonlocal handled
            async for delivery in inbox:
                await delivery.ack()
                handled += 1

        agents = [asyncio.create_task(serve(inbox)) for inbox in inboxes]
        await asyncio.sleep(0.01)  # every agent waits
        gc.freeze()  # what a host runner does once its agents run
        try:
            before = tracked()
            await bus.broadcast("pm", "all hands")
            async with asyncio.timeout(WAIT):
                while handled < AGENTS:
                    await asyncio.sleep(0.001)
            for n in range(AGENTS):  # then each agent holds a direct delivery of its own
                await bus.send("pm", f"dev-{n}", "hello")
            async with asyncio.timeout(WAIT):
                while handled < 2 * AGENTS:
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)  # every agent waits again
            after = tracked()
        finally:
            gc.unfreeze()
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
    grown = {kind: (after[kind] - before[kind]) / AGENTS for kind in after}
    # Each agent waits on its inbox's own awaitable through the wake-up callback its task makes for the
    # wait, and holds its last delivery (and that message's UUID). It was also a coroutine (the inbox's
    # _next), a future and its iterator, plus a future, an iterator and a callback of the memory backend's
    # consumer loop per inbox, a route tuple (the inbox's group and the db-writer's) and the delivery's
    # resolved settled_future: 11 objects per agent, now 3.
    for kind in ("coroutine", "FutureIter", "Future", "tuple"):
        assert grown.get(kind, 0) < 0.1, (kind, grown)
    assert grown.get("builtin_function_or_method", 0) <= 1.25, grown
    assert sum(after.values()) - sum(before.values()) <= 4 * AGENTS, grown  # 3, and weakrefs of the run


async def _waiting(task: asyncio.Task[object]) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


async def test_two_loops_on_one_inbox_share_its_deliveries_and_a_cancelled_one_passes_its_wake_up_on() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def loop(name: str) -> None:
            async for delivery in inbox:
                got[name].append(delivery.message.content)
                await delivery.ack()

        a = asyncio.create_task(loop("a"))
        await _waiting(a)
        b = asyncio.create_task(loop("b"))
        await _waiting(b)
        # The mailbox wakes the first waiter (a) when the message is put; a is cancelled before it runs:
        # the wake-up must reach b, or the message waits in the inbox with b asleep.
        inbox.offer(_FakeDelivery("one"))
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        async with asyncio.timeout(WAIT):
            while got["b"] != ["one"]:
                await asyncio.sleep(0.001)
        assert got["a"] == []
        await bus.send("pm", "dev-1", "two")
        async with asyncio.timeout(WAIT):
            while got["b"] != ["one", "two"]:
                await asyncio.sleep(0.001)
        await inbox.close()
        await asyncio.wait_for(b, WAIT)  # closing ends the loop still waiting


async def test_an_agent_cancelled_while_waiting_can_iterate_again() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        async def first() -> Delivery:
            async for delivery in inbox:
                return delivery
            raise AssertionError("the inbox closed")

        waiting = asyncio.create_task(first())
        await _waiting(waiting)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await bus.send("pm", "dev-1", "after the cancel")
        delivery = await asyncio.wait_for(first(), WAIT)
        assert delivery.message.content == "after the cancel"
        await delivery.ack()


async def test_asyncio_wraps_the_next_delivery_as_an_awaitable() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(inbox), 0.05)
        waiting = asyncio.ensure_future(anext(inbox))
        await _waiting(waiting)
        await bus.send("pm", "dev-1", "one")
        delivery = await asyncio.wait_for(waiting, WAIT)
        assert delivery.message.content == "one"
        await delivery.ack()
        await bus.send("pm", "dev-1", "two")
        delivery = await asyncio.wait_for(anext(inbox), WAIT)
        assert delivery.message.content == "two"
        await delivery.ack()


async def test_the_next_delivery_waits_the_same_under_a_tracer() -> None:
    # With a trace function set (coverage, debuggers) a coroutine steps its awaitable with send(), not __next__.
    previous = sys.gettrace()
    sys.settrace(lambda *args: None)
    try:
        async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
            async def first() -> str:
                async for delivery in inbox:
                    await delivery.ack()
                    return delivery.message.content
                return "closed"

            waiting = asyncio.create_task(first())
            await _waiting(waiting)
            await bus.send("pm", "dev-1", "traced")
            assert await asyncio.wait_for(waiting, WAIT) == "traced"
    finally:
        sys.settrace(previous)


class _FakeDelivery(Delivery):
    """A delivery put straight into an inbox (as a broadcast copy is), settled in place."""

    def __init__(self, content: str) -> None:
        super().__init__(Message(id=new_id(), created_at=utcnow(), sender_id="pm", recipient_id="dev-1",
                                 subject="agent.message.dev-1", content=content), attempt=1, group="inbox-dev-1")

    def _ack(self) -> None:
        pass

    def _nack(self, delay: float) -> None:
        pass
