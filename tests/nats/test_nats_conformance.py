"""The conformance suite, unchanged, on a single JetStream server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import nats
from squadbus.backends.nats.settings import NatsSettings
from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases

pytestmark = pytest.mark.nats


class TestNatsConformance(ConformanceSuite, HostProcessCases):
    # Inboxes cost no JetStream consumer (backends/nats/inboxes.py, design N2): the broadcast
    # subscriptions of a Bus are its only consumers.
    features = Features(name="nats", persistent=True, dedupe=True, replay=True, timeout=20.0,
                        inbox_scale=2000, inbox_resource_bound=8, inboxes_multiplexed=True)

    @pytest.fixture
    async def broker_resources(self, nats_url: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
        """JetStream consumers on the squad's stream."""
        client = await nats.connect(nats_url)
        stream = NatsSettings.from_url(nats_url).stream

        async def count() -> int:
            info = await client.jetstream().stream_info(stream)
            return info.state.consumer_count

        yield count
        await client.close()

    @pytest.fixture
    async def bus_factory(self, nats_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(nats_url).start()

        return make

    @pytest.fixture
    def bus_url(self, nats_url: str) -> str:
        return nats_url
