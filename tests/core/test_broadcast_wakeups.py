"""A broadcast wakes the agents waiting on it with one loop callback, not one per agent (``core.inbox.Wakeups``).

Counts and outcomes, not timings (the CPU per copy is ``bench/bench_fanout.py``'s figure): how many
callbacks the loop is handed while a squad broadcast reaches every waiting agent, and that an agent
cancelled between its wake-up and its turn loses nothing.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message, new_id, utcnow
from squadbus.core.inbox import Inbox, Wakeups, _NextDelivery

WAIT = 5.0
AGENTS = 200


async def _waiting(*tasks: asyncio.Task[object]) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    assert not any(task.done() for task in tasks)


class _Copy(Delivery):
    """A delivery put straight into an inbox, as the broadcast hub's copies are."""

    def __init__(self, content: str) -> None:
        super().__init__(Message(id=new_id(), created_at=utcnow(), sender_id="pm", recipient_id=None,
                                 subject="agent.message.broadcast", content=content), group="inbox-dev-1")

    def _ack(self) -> None:
        pass

    def _nack(self, delay: float) -> None:
        pass


async def test_a_squad_broadcast_wakes_every_waiting_agent_with_one_loop_callback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with Bus.from_url("memory://") as bus:
        inboxes = [await bus.inbox(f"dev-{n}", domains=("dev",)).open() for n in range(AGENTS)]
        got: list[str] = []

        async def serve(inbox: Inbox) -> None:
            async for delivery in inbox:
                async with delivery:
                    got.append(inbox.agent_id)

        agents = [asyncio.create_task(serve(inbox)) for inbox in inboxes]
        await _waiting(*agents)
        loop = asyncio.get_running_loop()
        scheduled: list[Callable[..., Any]] = []
        call_soon = loop.call_soon

        def counting(callback: Callable[..., Any], *args: Any, context: Any = None) -> asyncio.Handle:
            scheduled.append(callback)
            return call_soon(callback, *args, context=context)

        monkeypatch.setattr(loop, "call_soon", counting)
        try:
            await bus.broadcast("pm", "all hands")
            async with asyncio.timeout(WAIT):
                while len(got) < AGENTS:
                    await asyncio.sleep(0.001)
        finally:
            monkeypatch.undo()
            for task in agents:
                task.cancel()
            await asyncio.gather(*agents, return_exceptions=True)
        assert sorted(got) == sorted(inbox.agent_id for inbox in inboxes)
        # One wake-up per agent was one loop callback per agent (AGENTS of them); now one for the fan-out,
        # and the few of publishing and of the hub's own wait.
        assert len(scheduled) < AGENTS / 10, scheduled[:20]


async def test_an_agent_cancelled_after_its_wake_up_loses_nothing_and_a_second_loop_gets_it() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        got: dict[str, list[str]] = {"a": [], "b": []}

        async def serve(name: str) -> None:
            async for delivery in inbox:
                async with delivery:
                    got[name].append(delivery.message.content)

        a = asyncio.create_task(serve("a"))
        await _waiting(a)
        b = asyncio.create_task(serve("b"))
        await _waiting(b)
        wakeups = Wakeups(asyncio.get_running_loop())
        assert inbox.offer(_Copy("one"), wakeups)  # wakes a, through the batch
        a.cancel()  # before the batch runs
        wakeups.flush()
        with pytest.raises(asyncio.CancelledError):
            await a
        async with asyncio.timeout(WAIT):
            while got["b"] != ["one"]:
                await asyncio.sleep(0.001)
        assert got["a"] == []
        await inbox.close()
        await asyncio.wait_for(b, WAIT)


async def test_a_cancelled_agent_gets_the_copy_it_was_woken_for_when_it_iterates_again() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        async def first() -> str:
            async for delivery in inbox:
                async with delivery:
                    return delivery.message.content
            return "closed"

        waiting = asyncio.create_task(first())
        await _waiting(waiting)
        wakeups = Wakeups(asyncio.get_running_loop())
        assert inbox.offer(_Copy("kept"), wakeups)
        waiting.cancel()
        wakeups.flush()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert await asyncio.wait_for(first(), WAIT) == "kept"


async def test_a_wake_up_that_raises_goes_to_the_loop_exception_handler_and_the_rest_run() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    ran: list[str] = []
    done = asyncio.Event()

    def boom(_waiter: object) -> None:
        raise RuntimeError("boom")

    def last(_waiter: object) -> None:
        ran.append("three")
        done.set()

    async with Bus.from_url("memory://") as bus:
        inbox = bus.inbox("dev-1")
        callbacks: dict[str, Callable[[Any], object] | None] = {
            "one": lambda w: ran.append("one"), "two": boom, "removed": None,  # removed before the batch ran
            "three": last}
        waiters = {}
        for name, callback in callbacks.items():  # as a woken waiter holds its task's wake-up until the batch
            waiters[name] = _NextDelivery(inbox)
            waiters[name]._callback = callback
        try:
            wakeups = Wakeups(loop)
            for name in ("one", "two", "removed", "three"):
                wakeups.add(waiters[name])
            wakeups.flush()
            wakeups.flush()  # nothing left: schedules nothing
            await asyncio.wait_for(done.wait(), WAIT)
        finally:
            loop.set_exception_handler(previous)
    assert ran == ["one", "three"]
    assert [str(e["exception"]) for e in errors] == ["boom"]


async def test_a_broadcast_waiting_for_its_copies_holds_no_object_per_inbox_but_the_copy() -> None:
    async with Bus.from_url("memory://") as bus:
        inboxes = [await bus.inbox(f"dev-{n}").open() for n in range(AGENTS)]
        taken: list[Delivery] = []

        async def hold(inbox: Inbox) -> None:  # takes its copy and does not settle it yet
            taken.append(await inbox.get())

        gc.collect()
        before = Counter(type(o).__qualname__ for o in gc.get_objects())
        await bus.broadcast("pm", "all hands")
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(hold(inbox) for inbox in inboxes))
        gc.collect()
        during = Counter(type(o).__qualname__ for o in gc.get_objects())
        for delivery in taken:
            await delivery.ack()
        grown = {kind: (during[kind] - before[kind]) / AGENTS for kind in during}
        assert grown.get("_Copy", 0) == 1, grown
        # The fan-out's snapshot of its listeners was a list of (inbox, policy) tuples: one more per inbox.
        assert grown.get("tuple", 0) < 0.1, grown
