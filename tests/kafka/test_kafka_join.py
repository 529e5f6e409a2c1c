"""A group subscription returns once the group has joined; on tansu the group timeouts are tuned at connect."""

from __future__ import annotations

import uuid

import pytest

from squadbus.backends.kafka import KafkaBackend, KafkaSettings
from squadbus.backends.kafka._driver import AIOKafkaAdminClient
from squadbus.core.backend import Delivery, durable_name
from squadbus.core.bus import Bus
from squadbus.testing.servers.kafka import TansuServer

pytestmark = pytest.mark.kafka


async def _noop(delivery: Delivery) -> None:
    return None


async def test_connect_tunes_group_timeouts_for_tansu(tansu: TansuServer) -> None:
    backend = KafkaBackend(KafkaSettings.from_url(f"{tansu.url}?partitions=4&idempotence=off"))
    await backend.connect()
    try:
        assert (backend.settings.session_timeout_ms, backend.settings.heartbeat_interval_ms) == (3000, 1000)
    finally:
        await backend.close()
    given = KafkaBackend(KafkaSettings.from_url(f"{tansu.url}?partitions=4&idempotence=off&session_timeout_ms=4000"))
    await given.connect()
    try:
        assert (given.settings.session_timeout_ms, given.settings.heartbeat_interval_ms) == (4000, 1000)
    finally:
        await given.close()


async def test_with_join_wait_subscribe_returns_once_the_group_has_joined(tansu: TansuServer) -> None:
    group, pattern = f"joined-{uuid.uuid4().hex[:8]}", "agent.message.>"
    async with Bus.from_url(f"{tansu.url}?partitions=4&idempotence=off&join_wait=true") as bus:
        await bus.subscribe(pattern, _noop, group=group)
        admin = AIOKafkaAdminClient(bootstrap_servers=tansu.bootstrap)
        await admin.start()
        try:
            [described] = await admin.describe_consumer_groups([durable_name(group, pattern)])
        finally:
            await admin.close()
    [(error, _, state, _, _, members)] = described.groups  # aiokafka returns the response's tuples
    assert (error, state, len(members)) == (0, "Stable", 1), described
