"""The conformance suite, unchanged, on a private RabbitMQ node."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases

pytestmark = pytest.mark.rabbitmq


class TestRabbitConformance(ConformanceSuite, HostProcessCases):
    features = Features(
        name="rabbitmq", persistent=True, replay=True, splits_work=True, shared_attempts=True, timeout=20.0,
        # Deduplication is per publishing process only (a window of confirmed ids): RabbitMQ has no
        # broker-side dedupe without a plugin Debian does not ship; the store dedupes the rest.
        dedupe=False,
        # An inbox is a quorum queue and a channel of its own (issue 15's multiplexing is not done
        # here yet), so the scale case runs what that holds today.
        inbox_scale=50, inbox_resource_bound=None, inboxes_multiplexed=False,
    )

    @pytest.fixture
    async def bus_factory(self, rabbitmq_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(rabbitmq_url).start()

        return make

    @pytest.fixture
    def bus_url(self, rabbitmq_url: str) -> str:
        return rabbitmq_url
