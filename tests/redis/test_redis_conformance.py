"""The conformance suite, unchanged, on a real Redis."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases

pytestmark = pytest.mark.redis


class TestRedisConformance(ConformanceSuite, HostProcessCases):
    # Inboxes are multiplexed (backends/redis/inboxes.py): a Pub/Sub connection and a few pooled ones per Bus.
    # splits_work=False: the suite's group is on a literal subject, one stream, which an ordered group
    # (the default) serves with one member at a time; members split partition streams (wildcard patterns,
    # tests/redis/test_redis_group_order.py).
    features = Features(name="redis", persistent=True, dedupe=True, replay=True, splits_work=False, timeout=20.0,
                        inbox_scale=2000, inbox_resource_bound=8, inboxes_multiplexed=True)

    @pytest.fixture
    async def bus_factory(self, redis_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(redis_url).start()

        return make

    @pytest.fixture
    def bus_url(self, redis_url: str) -> str:
        return redis_url
