"""Fixtures: one private RabbitMQ node (with its own epmd) for the session, stopped by PID."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from squadbus.testing.servers.rabbitmq import RabbitServer


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    """One RabbitMQ node in a temp dir; fails (never skips) if rabbitmq-server is not installed."""
    with RabbitServer(tmp_path_factory.mktemp("rabbitmq")) as server:
        yield server


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitServer) -> str:
    """The node's URL with a fresh namespace (exchange, log stream and queues) for one test.

    A group created at EARLIEST reads the namespace's log once; a namespace per test keeps
    that read to the test's own messages instead of everything the session published.
    """
    return f"{rabbitmq_server.url}?namespace=t-{uuid.uuid4().hex[:12]}&connect_timeout=5"
