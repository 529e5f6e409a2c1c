"""Fixtures of the migration runbook tests: a private Redis, nats-server and tansu for this package's
module, started here (as tests/redis, tests/nats and tests/kafka start theirs) and stopped by PID.
Each test takes its own Redis prefix, NATS stream and Kafka topic, so tests never see each other."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import pytest

import nats
from squadbus.testing.servers.kafka import TansuServer
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.redis import RedisServer

# Short group timeouts: with tansu a group's first join takes about session_timeout / 2.
KAFKA_GROUP_OPTIONS = "session_timeout_ms=3000&heartbeat_interval_ms=1000"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A durable-profile redis-server for the module (a missing binary fails, never skips)."""
    with RedisServer("durable") as server:
        yield server


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server with JetStream for the module; fails if the binary is missing."""
    with NatsServer(tmp_path_factory.mktemp("nats-migration")) as server:
        yield server


@pytest.fixture(scope="module")
def tansu() -> Iterator[TansuServer]:
    """A tansu broker (memory storage) for the module, stopped by PID."""
    server = TansuServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _tag() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The old side: a fresh key prefix on the module's Redis."""
    return f"{redis_server.url}?prefix={_tag()}&block=0.5"


async def _delete_stream(url: str, stream: str) -> None:
    nc = await nats.connect(url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> Iterator[str]:
    """A new side: a stream of its own on the module's nats-server. Every squadbus stream holds
    ``agent.>`` and JetStream refuses two streams with overlapping subjects, so it is deleted after."""
    stream = _tag()
    yield f"{nats_server.url}?stream={stream}"
    asyncio.run(_delete_stream(nats_server.url, stream))


@pytest.fixture
def kafka_url(tansu: TansuServer) -> str:
    """A new side: topics of their own on the module's tansu (4 partitions, no idempotence)."""
    return f"{tansu.url}?partitions=4&idempotence=off&topic={_tag()}&{KAFKA_GROUP_OPTIONS}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """SQUADBUS_DATA_DIR of the verify and bridge children, and where spools go."""
    path = tmp_path / "data"
    path.mkdir()
    return path
