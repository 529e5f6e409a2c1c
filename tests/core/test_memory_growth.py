"""A memory Bus that has settled everything holds no object per message it carried.

Counts, not timings: after a warm-up, the live objects of each type are counted; then many more
messages of every kind go through (direct, squad and domain broadcasts, request and reply, a nack
and its redelivery, a group reading everything) and, once all are settled, no type may have grown
with them. With ``retain_messages=0``: the replay window keeps messages on purpose.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter

from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.core.backend import Delivery
from squadbus.core.bus import REPLY_TO, Bus
from squadbus.core.inbox import Inbox

AGENTS = 10
ROUND = 200
SLACK = 30
"""Objects a round may leave beyond the last (which futures the agents wait on when it ends): a type
growing with the messages grows by hundreds over three rounds (one per request, per delivery...)."""


def live_objects() -> Counter[str]:
    gc.collect()
    return Counter(type(o).__qualname__ for o in gc.get_objects())


async def test_settled_messages_leave_no_objects_behind() -> None:
    backend = MemoryBackend(MemorySettings(retain_messages=0))
    async with Bus(backend) as bus:
        seen = 0

        async def everything(delivery: Delivery) -> None:
            nonlocal seen
            seen += 1

        await bus.subscribe("agent.>", everything, group="history")
        inboxes = [await bus.inbox(f"dev-{n}", domains=("dev",)).open() for n in range(AGENTS)]
        nacked: set[str] = set()

        async def serve(inbox: Inbox) -> None:
            async for delivery in inbox:
                message = delivery.message
                if message.content == "nack me" and message.id.hex not in nacked:
                    nacked.add(message.id.hex)
                    await delivery.nack()
                    continue
                if message.headers.get(REPLY_TO):
                    await bus.reply(message, inbox.agent_id, "done")
                await delivery.ack()

        agents = [asyncio.create_task(serve(inbox)) for inbox in inboxes]

        async def one_round() -> None:
            for n in range(ROUND):
                agent = f"dev-{n % AGENTS}"
                await bus.send("pm", agent, "nack me" if n % 20 == 0 else "hello")
                if n % 5 == 0:
                    await bus.request("pm", agent, "status?", timeout=5)
                if n % 25 == 0:
                    await bus.broadcast("pm", "all hands")
                    await bus.broadcast("pm", "devs", domain="dev")
            async with asyncio.timeout(10):
                while any(g["pending"] or g["inflight"] for g in backend.stats()["groups"]) \
                        or not all(inbox._queue.empty() for inbox in inboxes):
                    await asyncio.sleep(0.01)

        await one_round()
        await one_round()
        live_objects()  # under pytest the first count differed from every later one by ~50 weakrefs
        await one_round()
        before = live_objects()
        for _ in range(3):
            await one_round()
        after = live_objects()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    grown = {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind] > SLACK}
    assert grown == {}, f"objects that grew with {3 * ROUND} more messages: {grown}"
    assert seen > 3 * ROUND


async def test_an_idle_agent_waits_without_coroutines_of_the_bus() -> None:
    """An agent waiting in ``async for delivery in inbox`` after a message costs its own coroutine and
    the inbox's ``_next``, nothing more: with 10,000 agents every object of a wait is scanned by each
    full collection (scenario 5's GC pauses). It was 6 coroutines per agent."""
    agents = 100
    async with Bus(MemoryBackend()) as bus:
        inboxes = [await bus.inbox(f"dev-{n}", broadcasts=False).open() for n in range(agents)]
        handled = 0

        async def serve(inbox: Inbox) -> None:
            nonlocal handled
            async for delivery in inbox:
                await delivery.ack()
                handled += 1

        before = live_objects()
        tasks = [asyncio.create_task(serve(inbox)) for inbox in inboxes]
        for n in range(agents):
            await bus.send("pm", f"dev-{n}", "hello")
        async with asyncio.timeout(10):
            while handled < agents:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # every agent and member is back waiting
        after = live_objects()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert (after["coroutine"] - before["coroutine"]) / agents <= 2
