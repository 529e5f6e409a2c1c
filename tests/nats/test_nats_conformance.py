"""The conformance suite, unchanged, on a single JetStream server."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features

pytestmark = pytest.mark.nats


class TestNatsConformance(ConformanceSuite):
    features = Features(name="nats", persistent=True, dedupe=True, replay=True, timeout=20.0)

    @pytest.fixture
    async def bus_factory(self, nats_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(nats_url).start()

        return make
