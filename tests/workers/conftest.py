"""Fixtures: a private JetStream server per test (the db-writer's group and stream are fixed names)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from squadbus.testing.servers.nats import NatsServer


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A nats-server of this test alone; fails if the binary is missing."""
    with NatsServer(tmp_path / "nats") as server:
        yield server.url
