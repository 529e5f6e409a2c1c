"""The migration runbook's blue-green (docs/migration.md) from Redis to RabbitMQ: dual-write with the
spool, ``squadbus verify`` while producers write, the group moved, then the producers, nothing lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from squadbus.testing.servers.redis import RedisServer
from tests.migration.test_runbook import blue_green

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A durable-profile redis-server for this module (a missing binary fails, never skips)."""
    with RedisServer("durable") as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """SQUADBUS_DATA_DIR of the verify children, and where spools go."""
    path = tmp_path / "data"
    path.mkdir()
    return path


async def test_redis_to_rabbitmq_blue_green(redis_server: RedisServer, rabbitmq_url: str, data_dir: Path) -> None:
    await blue_green(f"{redis_server.url}?prefix=to-rabbit&block=0.5", rabbitmq_url, data_dir)
