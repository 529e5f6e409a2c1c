"""Publishers blocked on full memory groups are admitted in the order they arrived (no sender starves).

Each send takes a ticket as it enters ``Bus.send``; a group's buffer is first in, first out, so the
order its handler sees is the order sends were admitted. A send *overtaken* by later tickets waited
while they went through: under ``squadbus bench --max`` one send waited out a whole 5-s run that way.
A newcomer may pass publishers admitted but not run yet, into the free slots only: at most a group's
``max_pending`` later sends go before any one (backends/memory/admission.py).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus


def overtaken(order: list[int]) -> int:
    """The most later tickets admitted before any one ticket."""
    worst = 0
    for position, ticket in enumerate(order):
        worst = max(worst, sum(1 for earlier in order[:position] if earlier > ticket))
    return worst


async def _run_senders(bus: Bus, senders: int, sends: int, recipients: list[str]) -> None:
    tickets = itertools.count()

    async def sender(number: int) -> None:
        for k in range(sends):
            await bus.send("pm", recipients[(number + k) % len(recipients)], str(next(tickets)))

    await asyncio.gather(*(sender(n) for n in range(senders)))


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.001)


async def test_senders_to_one_full_group_are_admitted_in_arrival_order() -> None:
    got: list[int] = []

    async def handler(delivery: Delivery) -> None:
        got.append(int(delivery.message.content))
        await asyncio.sleep(0)  # a consumer slower than 20 senders: the group stays full

    async with Bus(MemoryBackend()) as bus:
        await bus.subscribe("agent.message.dev-1", handler, group="g", options=ConsumerOptions(max_pending=4))
        await _run_senders(bus, senders=20, sends=30, recipients=["dev-1"])
        await _until(lambda: len(got) == 600)
    assert sorted(got) == list(range(600))
    assert overtaken(got) <= 4


@pytest.mark.parametrize(("agents", "senders", "sends"), [(1, 9, 5), (2, 12, 25)])
async def test_senders_to_several_full_groups_all_get_through_in_arrival_order(
    agents: int, senders: int, sends: int
) -> None:
    """Each message goes to its agent's group and to one group reading every subject (the db-writer's
    shape); both fill up. Every publisher gets through, and each agent's group gets its messages in
    the order they were sent, give or take its free slots. (A publisher woken by one group used to
    give its slot away when the other group had waiters: with both full, the publishers handed
    slots around and none ever pushed.)"""
    recipients = [f"dev-{n}" for n in range(agents)]
    per_agent: dict[str, list[int]] = {agent: [] for agent in recipients}
    everything: list[int] = []

    def recorder(into: list[int], pauses: int) -> Callable[[Delivery], Awaitable[None]]:
        async def handler(delivery: Delivery) -> None:
            into.append(int(delivery.message.content))
            for _ in range(pauses):
                await asyncio.sleep(0)
        return handler

    async with Bus(MemoryBackend(MemorySettings(publish_timeout=5))) as bus:
        small = ConsumerOptions(max_pending=2)
        for agent, into in per_agent.items():
            await bus.subscribe(f"agent.message.{agent}", recorder(into, 1), group="inbox", options=small)
        await bus.subscribe("agent.>", recorder(everything, 2), group="all", options=small)
        await _run_senders(bus, senders, sends, recipients)
        total = senders * sends
        await _until(lambda: len(everything) == total and sum(map(len, per_agent.values())) == total)
    assert sorted(everything) == list(range(total))
    assert max(overtaken(got) for got in per_agent.values()) <= 2


async def test_a_publisher_that_gives_up_in_a_queue_lets_the_others_through() -> None:
    """A publisher queued on two full groups is cancelled (as ``publish_timeout`` does): the one
    behind it goes through once there is room, and nothing stays reserved or queued."""
    backend = MemoryBackend()
    release = asyncio.Event()
    got: list[str] = []

    async def held(delivery: Delivery) -> None:
        await release.wait()
        got.append(delivery.message.content)

    async with Bus(backend) as bus:
        one = ConsumerOptions(max_pending=1)
        await bus.subscribe("agent.message.dev-1", held, group="inbox", options=one)
        await bus.subscribe("agent.>", held, group="all", options=one)
        await bus.send("pm", "dev-1", "in the handlers")
        await asyncio.sleep(0)
        await bus.send("pm", "dev-1", "buffered")
        gives_up = asyncio.create_task(bus.send("pm", "dev-1", "gives up"))
        await asyncio.sleep(0)
        waits = asyncio.create_task(bus.send("pm", "dev-1", "waits"))
        await asyncio.sleep(0)
        assert [len(g.space_waiters) for g in backend._groups.values()] == [2, 0]  # queued where it stopped
        gives_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gives_up
        release.set()
        await asyncio.wait_for(waits, 5)
        await _until(lambda: len(got) == 6)
        groups = list(backend._groups.values())
    assert sorted(got) == sorted(["in the handlers", "buffered", "waits"] * 2)
    assert [(g.reserved, g.space_waiters) for g in groups] == [(0, []), (0, [])]
