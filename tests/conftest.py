"""Fixtures shared by every test package: one private PostgreSQL cluster for the whole session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from squadbus.testing.servers.postgres import PostgresServer, running_postgres


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
