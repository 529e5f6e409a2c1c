"""The conformance suite on the Kafka backend, against a real tansu broker."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features, HostProcessCases

pytestmark = pytest.mark.kafka


class TestKafkaConformance(ConformanceSuite, HostProcessCases):
    # tansu has no broker-side dedupe by id (no idempotent producer), and group
    # joins take about session_timeout / 2, hence the longer timeout. Attempts
    # are counted in memory per consumer (see backends/kafka/consumer.py).
    # inbox_scale: one aiokafka consumer (a group of its own) per subscription today (issue 15);
    # the resource bound is on group members, counted here as connections (each member holds one).
    features = Features(name="kafka", persistent=True, dedupe=False, replay=True, shared_attempts=False, timeout=30.0,
                        inbox_scale=20, inbox_resource_bound=4)

    @pytest.fixture
    async def bus_factory(self, kafka_url: str) -> BusFactory:
        async def make() -> Bus:
            return await Bus.from_url(kafka_url).start()

        return make

    @pytest.fixture
    def bus_url(self, kafka_url: str) -> str:
        return kafka_url
