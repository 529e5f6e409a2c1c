"""The conformance suite, unchanged, on a private RabbitMQ node."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence

import pytest

from squadbus.backends.rabbitmq.placement import host_of, host_url
from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases
from squadbus.testing.servers.rabbitmq import RabbitServer

pytestmark = pytest.mark.rabbitmq


def place_by_partition(url: str, agents: Sequence[str], hosts: int) -> list[tuple[str, list[str]]]:
    """Host ``i`` of ``hosts`` reads the inbox partitions ``p % hosts == i`` (its slot in its URL) and so
    serves the agents of those partitions: how a deployment places agents on RabbitMQ (docs/backends/rabbitmq.md)."""
    return [(host_url(url, i, hosts), [a for a in agents if host_of(url, a, hosts) == i]) for i in range(hosts)]


class TestRabbitConformance(ConformanceSuite, HostProcessCases):
    features = Features(
        name="rabbitmq", persistent=True, replay=True, splits_work=True, shared_attempts=True, timeout=20.0,
        # Deduplication is per publishing process only (a window of confirmed ids): RabbitMQ has no
        # broker-side dedupe without a plugin Debian does not ship; the store dedupes the rest.
        dedupe=False,
        # Inboxes: a fixed set of partition queues per squad, one channel (and a consumer per partition)
        # per Bus, nothing per agent (backends/rabbitmq/inboxes.py). The bound is on channels.
        inbox_scale=2000, inbox_resource_bound=4, inboxes_multiplexed=True, host_placement=place_by_partition,
    )

    @pytest.fixture
    def broker_resources(self, rabbitmq_server: RabbitServer) -> Callable[[], Awaitable[int]]:
        """AMQP channels open on the node (rabbitmqctl list_channels)."""
        async def count() -> int:
            listing = await asyncio.to_thread(rabbitmq_server.ctl, "list_channels", "pid", "--quiet")
            return len([line for line in listing.splitlines()[1:] if line.strip()])

        return count

    @pytest.fixture
    async def bus_factory(self, rabbitmq_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(rabbitmq_url).start()

        return make

    @pytest.fixture
    def bus_url(self, rabbitmq_url: str) -> str:
        return rabbitmq_url


class TestRabbitFastConformance(TestRabbitConformance):
    """The same suite under ``profile=fast``: classic group and inbox queues, transient messages, the same
    log stream (replay and backlog unchanged); attempts are counted by each consumer with the broker's
    ``redelivered`` flag, which still gives a closed consumer's message attempt 2 at the next one."""

    features = dataclasses.replace(TestRabbitConformance.features, name="rabbitmq-fast", persistent=False)

    @pytest.fixture
    def rabbitmq_url(self, rabbitmq_url: str) -> str:
        return f"{rabbitmq_url}&profile=fast"
