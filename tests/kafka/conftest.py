"""Fixtures of the Kafka backend tests: one private tansu broker per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from squadbus.testing.servers.kafka import TansuServer

# Short group timeouts: with tansu a group's first join takes about session_timeout / 2.
GROUP_OPTIONS = "session_timeout_ms=3000&heartbeat_interval_ms=1000"


@pytest.fixture(scope="session")
def tansu() -> Iterator[TansuServer]:
    """A tansu broker on a free loopback port (memory storage), stopped by PID at the end."""
    server = TansuServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_url(tansu: TansuServer) -> str:
    """The squadbus URL of the session broker: 4 partitions, no idempotence (tansu refuses it)."""
    return f"{tansu.url}?partitions=4&idempotence=off&{GROUP_OPTIONS}"
