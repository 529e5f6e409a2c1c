"""Fixtures: a private redis-server (fast profile) shared by the session, and helpers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from squadbus.testing.servers.redis import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One fast-profile redis-server for the whole session (a missing binary fails, never skips)."""
    server = RedisServer("fast")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL with a fresh key prefix, so tests never see each other's streams."""
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}&block=0.5"
