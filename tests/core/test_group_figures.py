"""The memory backend's DescribesGroups: exact lag, pending and dead letters per group."""

from __future__ import annotations

from squadbus.backends.dual import DualBackend
from squadbus.backends.memory import MemoryBackend, MemorySettings
from squadbus.core.backend import DescribesGroups, group_of
from squadbus.core.bus import Bus
from tests.core.group_scenario import DEAD, HELD, WAITING, figures_of, scenario, wait_for_figures


async def test_memory_reports_lag_pending_and_dead_letters_exactly() -> None:
    backend = MemoryBackend()
    assert isinstance(backend, DescribesGroups)
    async with Bus(backend) as bus, scenario(bus, "workers") as pattern:
        got = await wait_for_figures(backend, "workers", lambda f: f.pending == HELD and f.dead_letters == DEAD)
        assert (got.subject, got.lag, got.pending, got.dead_letters, got.redeliveries) == (
            pattern, WAITING, HELD, DEAD, None)


async def test_memory_without_a_replay_window_cannot_count_dead_letters() -> None:
    backend = MemoryBackend(MemorySettings(retain_messages=0))
    async with Bus(backend) as bus:
        await bus.subscribe("agent.message.x", lambda d: _noop(), group="g")
        (got,) = await figures_of(backend, "g")
        assert (got.lag, got.pending, got.dead_letters) == (0, 0, None)


async def test_ephemeral_subscriptions_are_not_groups() -> None:
    backend = MemoryBackend()
    async with Bus(backend) as bus:
        await bus.subscribe("agent.message.x", lambda d: _noop())
        assert await backend.group_figures() == []


async def test_dual_reports_the_primary_groups() -> None:
    primary, secondary = MemoryBackend(), MemoryBackend()
    dual = DualBackend(primary, secondary)
    assert isinstance(dual, DescribesGroups)
    async with Bus(dual) as bus:
        await bus.subscribe("agent.message.x", lambda d: _noop(), group="g")
        assert [f.group for f in await dual.group_figures()] == ["g"]


def test_group_of_reads_a_durable_name_back() -> None:
    from squadbus.core.backend import durable_name

    assert group_of(durable_name("db-writer", "agent.>")) == "db-writer"
    assert group_of(durable_name("a:b", "agent.>")) == "a_b"
    assert group_of("plain") is None
    assert group_of("x-notahex!") is None
    assert group_of("-0123abcd") is None


async def _noop() -> None:
    return None
