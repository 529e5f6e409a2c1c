"""NATS DescribesGroups against a real JetStream server: consumer info per durable consumer."""

from __future__ import annotations

import uuid

import pytest

from squadbus.backends.nats import NatsBackend, NatsSettings
from squadbus.core.backend import DescribesGroups
from squadbus.core.bus import Bus
from tests.core.group_scenario import DEAD, HELD, WAITING, figures_of, scenario, wait_for_figures

pytestmark = pytest.mark.nats


def _backend(nats_url: str) -> NatsBackend:
    return NatsBackend(NatsSettings.from_url(nats_url))  # the session stream: groups and subjects are unique


def _group() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


async def test_nats_reports_lag_pending_and_dead_letters_exactly(nats_url: str) -> None:
    backend = _backend(nats_url)
    assert isinstance(backend, DescribesGroups)
    group = _group()
    async with Bus(backend) as bus, scenario(bus, group) as pattern:
        got = await wait_for_figures(backend, group, lambda f: f.pending == HELD and f.lag == WAITING)
        assert (got.subject, got.lag, got.pending, got.dead_letters, got.redeliveries) == (
            pattern, WAITING, HELD, DEAD, 0)


async def test_nats_sees_groups_of_other_processes(nats_url: str) -> None:
    group, pattern = _group(), f"agent.message.{uuid.uuid4().hex[:8]}"
    async with Bus(_backend(nats_url)) as other:
        await other.subscribe(pattern, _noop, group=group)
        await other.send("pm", "nobody", "not for the group")
        observer = _backend(nats_url)
        await observer.connect()
        try:
            (got,) = await figures_of(observer, group)
            assert (got.subject, got.dead_letters) == (pattern, 0)
            assert got.lag == 0 and got.pending == 0
        finally:
            await observer.close()


async def test_ephemeral_consumers_are_not_groups(nats_url: str) -> None:
    backend = _backend(nats_url)
    async with Bus(backend) as bus:
        pattern = f"agent.message.{uuid.uuid4().hex[:8]}"
        await bus.subscribe(pattern, _noop)
        assert [f for f in await backend.group_figures() if f.subject == pattern] == []


async def _noop(*_: object) -> None:
    return None
