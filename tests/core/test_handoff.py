"""Handoff: the reader-to-workers FIFO of the Redis consumer."""

from __future__ import annotations

import asyncio

from squadbus.core.handoff import Handoff


async def test_items_come_out_in_order_without_waiting() -> None:
    handoff: Handoff[int] = Handoff()
    for i in range(5):
        handoff.put(i)
    assert len(handoff) == 5
    assert [handoff.take() for _ in range(3)] == [0, 1, 2]
    assert await handoff.get() == 3
    assert handoff.drain() == [4]
    assert handoff.take() is None and len(handoff) == 0


async def test_each_put_wakes_one_waiting_worker() -> None:
    handoff: Handoff[str] = Handoff()
    got: list[str] = []

    async def worker() -> None:
        got.append(await handoff.get())

    workers = [asyncio.create_task(worker()) for _ in range(3)]
    await asyncio.sleep(0)
    handoff.put("a")
    handoff.put("b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(got) == ["a", "b"]
    assert sum(task.done() for task in workers) == 2
    handoff.put("c")
    await asyncio.gather(*workers)
    assert sorted(got) == ["a", "b", "c"]


async def test_a_worker_cancelled_as_it_is_woken_passes_the_item_on() -> None:
    handoff: Handoff[str] = Handoff()
    first = asyncio.create_task(handoff.get())
    second = asyncio.create_task(handoff.get())
    await asyncio.sleep(0)
    handoff.put("x")  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1.0) == "x"
    assert first.cancelled()
