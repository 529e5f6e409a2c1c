"""Fixtures shared by every test package: one private PostgreSQL cluster and one redis-server (fast
profile) for the whole session; tests keep apart by database name or key prefix."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from squadbus.testing.servers.postgres import PostgresServer, running_postgres
from squadbus.testing.servers.redis import RedisServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster for the session (fails, never skips, without the binaries)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
async def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session cluster for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_server.url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return postgres_server.url_for(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One fast-profile redis-server for the session (a missing binary fails, never skips)."""
    with RedisServer("fast") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A URL on the session's redis-server with a fresh key prefix, so tests never see each other's streams."""
    return f"{redis_server.url}?prefix=t{uuid.uuid4().hex[:10]}&block=0.5"
