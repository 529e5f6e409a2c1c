"""Memory-backend behaviour beyond the conformance suite: slow consumers, replay window, settings."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.core.backend import ConsumerOptions, Delivery, SlowConsumerPolicy
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendTimeout, ConfigError


async def test_block_policy_makes_the_publisher_wait_and_loses_nothing() -> None:
    async with Bus(MemoryBackend()) as bus:
        release = asyncio.Event()
        got: list[str] = []

        async def slow(delivery: Delivery) -> None:
            await release.wait()
            got.append(delivery.message.content)

        await bus.subscribe("agent.message.dev-1", slow, group="g", options=ConsumerOptions(max_pending=2))
        for i in range(3):  # one in the handler, two buffered
            await bus.send("pm", "dev-1", str(i))
        await asyncio.sleep(0)
        blocked = asyncio.create_task(bus.send("pm", "dev-1", "3"))
        await asyncio.sleep(0.05)
        assert not blocked.done(), "the publisher should wait for buffer space"
        release.set()
        await asyncio.wait_for(blocked, 5)
        while len(got) < 4:
            await asyncio.sleep(0.01)
        assert got == ["0", "1", "2", "3"]


async def test_block_policy_times_out_with_nothing_published() -> None:
    backend = MemoryBackend(MemorySettings(publish_timeout=0.1))
    async with Bus(backend) as bus:
        stuck = asyncio.Event()
        fast: list[str] = []

        async def never(delivery: Delivery) -> None:
            await stuck.wait()

        async def record(delivery: Delivery) -> None:
            fast.append(delivery.message.content)

        await bus.subscribe("agent.message.dev-1", never, group="stuck", options=ConsumerOptions(max_pending=1))
        await bus.subscribe("agent.message.dev-1", record, group="fast")
        await bus.send("pm", "dev-1", "a")  # taken by the handler
        await bus.send("pm", "dev-1", "b")  # fills the buffer
        await asyncio.sleep(0.01)
        with pytest.raises(BackendTimeout):
            await bus.send("pm", "dev-1", "c")
        await asyncio.sleep(0.05)
        assert fast == ["a", "b"], "all-or-nothing: the group with room must not get 'c' either"
        stuck.set()


async def test_drop_oldest_policy_reports_the_gap() -> None:
    async with Bus(MemoryBackend()) as bus:
        release = asyncio.Event()
        seen: list[tuple[str, int]] = []

        async def viewer(delivery: Delivery) -> None:
            await release.wait()
            seen.append((delivery.message.content, delivery.gap_before))

        options = ConsumerOptions(max_pending=3, slow_consumer=SlowConsumerPolicy.DROP_OLDEST)
        await bus.subscribe("agent.message.dev-1", viewer, options=options)
        await bus.send("pm", "dev-1", "0")
        await asyncio.sleep(0.01)  # "0" is in the handler
        for i in range(1, 8):  # buffer of 3 keeps 5, 6, 7; 1..4 are dropped
            await bus.send("pm", "dev-1", str(i))
        release.set()
        while len(seen) < 4:
            await asyncio.sleep(0.01)
        assert seen == [("0", 0), ("5", 4), ("6", 0), ("7", 0)]
        assert bus.stats.gaps == 4


async def test_group_without_members_never_blocks_publishers() -> None:
    backend = MemoryBackend(MemorySettings(publish_timeout=0.2))
    async with Bus(backend) as bus:
        sub = await bus.subscribe("agent.message.dev-1", _noop, group="left", options=ConsumerOptions(max_pending=2))
        await bus.unsubscribe(sub)
        for i in range(10):
            await bus.send("pm", "dev-1", str(i))
        group = next(g for g in backend.stats()["groups"] if g["group"] == "left")
        assert group["pending"] == 2 and group["dropped"] == 8


async def test_replay_window_is_bounded_and_reported() -> None:
    backend = MemoryBackend(MemorySettings(retain_messages=5))
    async with Bus(backend) as bus:
        execution = uuid.uuid4()
        for i in range(8):
            await bus.send("pm", "dev-1", str(i), task_execution_id=execution)
        replayed = [m.content async for _, m in bus.replay(execution)]
        assert replayed == ["3", "4", "5", "6", "7"]
        window = backend.stats()["replay_window"]
        assert window == {"first_seq": 4, "last_seq": 8, "retained": 5, "trimmed": 3}


async def test_duplicates_are_counted() -> None:
    backend = MemoryBackend()
    async with Bus(backend) as bus:
        same = uuid.uuid4()
        await bus.send("pm", "dev-1", "x", id=same)
        await bus.send("pm", "dev-1", "x", id=same)
        assert backend.stats()["duplicates_dropped"] == 1


def test_settings_from_url() -> None:
    s = MemorySettings.from_url("memory://?retain_messages=10&dedupe_window=0&publish_timeout=1.5")
    assert (s.retain_messages, s.dedupe_window, s.publish_timeout) == (10, 0, 1.5)
    with pytest.raises(ConfigError, match="unknown"):
        MemorySettings.from_url("memory://?nope=1")
    with pytest.raises(ConfigError):
        MemorySettings.from_url("memory://?retain_messages=lots")
    with pytest.raises(ConfigError):
        MemorySettings(publish_timeout=0)


async def test_close_is_idempotent_and_finishes_the_handler_in_progress() -> None:
    backend = MemoryBackend()
    bus = await Bus(backend).start()
    finished: list[str] = []

    async def slowish(delivery: Delivery) -> None:
        await asyncio.sleep(0.05)
        finished.append(delivery.message.content)

    await bus.subscribe("agent.message.dev-1", slowish, group="g")
    await bus.send("pm", "dev-1", "in progress")
    await asyncio.sleep(0.01)
    await bus.close()
    await bus.close()
    assert finished == ["in progress"]


async def _noop(delivery: Delivery) -> None:
    return None


async def test_blocked_publishers_get_through_in_the_order_they_blocked() -> None:
    """A full group admits waiting publishers first come, first served: a publisher that arrives after a
    slot freed but before the woken waiters ran queues behind them (it used to take the slot, the woken
    ones went back to the end of the queue, and under steady load one send waited ~5 s)."""
    backend = MemoryBackend()
    async with Bus(backend) as bus:
        gate = asyncio.Queue[None]()
        got: list[str] = []

        async def one_at_a_time(delivery: Delivery) -> None:
            await gate.get()
            got.append(delivery.message.content)

        options = ConsumerOptions(max_pending=1, max_in_flight=1)
        await bus.subscribe("agent.message.dev-1", one_at_a_time, group="g", options=options)
        [group] = backend._groups.values()
        await bus.send("pm", "dev-1", "in the handler")
        await asyncio.sleep(0)
        await bus.send("pm", "dev-1", "buffered")
        waiting = []
        for name in ("first", "second"):
            waiting.append(asyncio.create_task(bus.send("pm", "dev-1", name)))
            await asyncio.sleep(0)
        assert len(group.space_waiters) == 2
        gate.put_nowait(None)  # the handler finishes one and takes 'buffered': one slot frees
        while len(group.buffer) == 1:
            await asyncio.sleep(0)
        for _ in range(5):
            gate.put_nowait(None)
        await asyncio.wait_for(bus.send("pm", "dev-1", "late"), 5)  # reaches the bus before the woken waiters run
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        while len(got) < 5:
            await asyncio.sleep(0.01)
    assert got == ["in the handler", "buffered", "first", "second", "late"]
