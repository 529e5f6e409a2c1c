"""The conformance suite on the Kafka backend, against a real tansu broker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import pytest

from squadbus.backends.kafka._driver import AIOKafkaAdminClient
from squadbus.backends.kafka.partitioner import partition_for
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases

pytestmark = pytest.mark.kafka


async def inbox_group_members(url: str) -> int:
    """Members of the inbox group on the broker now (the bound of issue 15 on Kafka: <= 4 per Bus)."""
    settings = KafkaSettings.from_url(url)
    admin = AIOKafkaAdminClient(bootstrap_servers=list(settings.bootstrap_servers))
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([settings.inbox_group])
    finally:
        await admin.close()
    return sum(len(group[5]) for response in described for group in response.groups
               if group[1] == settings.inbox_group)


def place_by_partition(url: str, agents: Sequence[str], hosts: int) -> list[tuple[str, list[str]]]:
    """Host ``i`` of ``hosts`` serves the inbox partitions ``p % hosts == i`` (its slot in its URL) and
    so the agents whose partition that is: how a deployment places agents on Kafka (docs/backends/kafka.md)."""
    ids = list(range(KafkaSettings.from_url(url).partitions))
    return [(f"{url}&inbox_hosts={hosts}&inbox_host={i}",
             [a for a in agents if partition_for(a.encode(), ids) % hosts == i]) for i in range(hosts)]


class TestKafkaConformance(ConformanceSuite, HostProcessCases):
    # tansu has no broker-side dedupe by id (no idempotent producer), and group
    # joins take about session_timeout / 2, hence the longer timeout. Attempts
    # are counted in memory per consumer (see backends/kafka/consumer.py).
    # Inboxes: one member of the inbox group per Bus (backends/kafka/inboxes.py); the bound
    # counted is the group's members on the broker.
    features = Features(name="kafka", persistent=True, dedupe=False, replay=True, shared_attempts=False, timeout=30.0,
                        inbox_scale=2000, inbox_resource_bound=4, inboxes_multiplexed=True,
                        host_placement=place_by_partition)

    @pytest.fixture
    async def bus_factory(self, kafka_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(kafka_url).start()

        return make

    @pytest.fixture
    def bus_url(self, kafka_url: str) -> str:
        return kafka_url

    @pytest.fixture
    def broker_resources(self, kafka_url: str) -> Callable[[], Awaitable[int]]:
        async def count() -> int:
            return await inbox_group_members(kafka_url)

        return count
