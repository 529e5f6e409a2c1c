"""Fixtures: a private redis-server (fast profile) shared by the session, and helpers."""

from __future__ import annotations

import uuid

import pytest

from squadbus.testing.servers.redis import RedisServer


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL with a fresh key prefix, so tests never see each other's streams."""
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}&block=0.5"
