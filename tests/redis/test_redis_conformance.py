"""The conformance suite, unchanged, on a real Redis."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features

pytestmark = pytest.mark.redis


class TestRedisConformance(ConformanceSuite):
    features = Features(name="redis", persistent=True, dedupe=True, replay=True, timeout=20.0)

    @pytest.fixture
    async def bus_factory(self, redis_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(redis_url).start()

        return make
