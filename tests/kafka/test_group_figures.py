"""Kafka DescribesGroups against tansu: lag = end offsets minus committed offsets."""

from __future__ import annotations

import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.core.backend import DescribesGroups
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendError
from squadbus.testing.servers.kafka import TansuServer
from tests.core.group_scenario import HELD, WAITING, figures_of, scenario, wait_for_figures
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka


def _group() -> str:
    return f"g{uuid.uuid4().hex[:8]}"


async def test_kafka_lag_counts_everything_not_committed(kafka_url: str) -> None:
    # acked and dead-lettered records are committed; held ones and those behind them are not
    backend = KafkaBackend(KafkaSettings.from_url(kafka_url))
    assert isinstance(backend, DescribesGroups)
    group = _group()
    async with Bus(backend) as bus, scenario(bus, group) as pattern:
        got = await wait_for_figures(backend, group, lambda f: f.lag == HELD + WAITING)
        assert (got.subject, got.pending, got.dead_letters, got.redeliveries) == (pattern, None, None, None)
        observer = KafkaBackend(KafkaSettings.from_url(kafka_url))
        await observer.connect()
        try:
            (seen,) = await figures_of(observer, group)  # no member here: found by ListGroups
            assert (seen.subject, seen.lag) == (backend.layout.main, HELD + WAITING)
        finally:
            await observer.close()


async def test_kafka_down_raises_a_backend_error() -> None:
    server = TansuServer()
    try:
        server.start()
        backend = KafkaBackend(KafkaSettings.from_url(
            f"{server.url}?partitions=2&idempotence=off&connect_timeout=2&{GROUP_OPTIONS}"))
        await backend.connect()
        try:
            server.stop()
            with pytest.raises(BackendError):
                await backend.group_figures()
        finally:
            await backend.close()
    finally:
        server.stop()
