"""The store suite on a real private PostgreSQL 15 cluster, plus PostgreSQL-only details."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from squadbus.core.errors import BackendError, ConfigError, ConnectionLost
from squadbus.store import open_store
from squadbus.store.migrations import POSTGRES_MIGRATIONS
from squadbus.store.postgres import PostgresSettings
from squadbus.testing.servers.postgres import PostgresServer
from squadbus.testing.servers.process import free_port
from tests.store.suite import Corrupt, StoreFactory, StoreSuite, msg

pytestmark = pytest.mark.postgres


class TestPostgresStore(StoreSuite):
    @pytest.fixture
    async def store_factory(self, postgres_factory: StoreFactory) -> StoreFactory:
        return postgres_factory

    @pytest.fixture
    def corrupt(self, postgres_url: str) -> Corrupt:
        async def run(message_id: uuid.UUID) -> None:
            conn = await asyncpg.connect(postgres_url)
            try:
                await conn.execute("UPDATE messages SET body = $1 WHERE id = $2", b"\xff not json", message_id)
            finally:
                await conn.close()

        return run


def test_url_parsing() -> None:
    s = PostgresSettings.from_url("postgresql+asyncpg://u:p@h:5433/db?max_size=4&sslmode=disable")
    assert s.dsn == "postgresql://u:p@h:5433/db?sslmode=disable"
    assert (s.min_size, s.max_size) == (1, 4)
    assert PostgresSettings.from_url("postgres://h/db").dsn == "postgresql://h/db"
    assert PostgresSettings.from_url("postgres://h/db").parallel_writes == 1
    with_parts = PostgresSettings.from_url("postgresql://h/db?parallel_writes=2&sslmode=disable")
    assert (with_parts.parallel_writes, with_parts.dsn) == (2, "postgresql://h/db?sslmode=disable")
    for bad in ("postgresql://h/db?max_size=x", "postgresql://h/db?min_size=5&max_size=2", "redis://h",
                "postgresql://h/db?parallel_writes=0"):
        with pytest.raises(ConfigError):
            PostgresSettings.from_url(bad)


async def test_unreachable_server_raises_connection_lost() -> None:
    store = open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2")
    with pytest.raises(ConnectionLost) as info:
        await store.open()
    assert info.value.__cause__ is not None
    await store.close()


async def test_server_restart_is_translated_then_recovers(postgres_server: PostgresServer, postgres_url: str) -> None:
    execution = uuid.uuid4()
    async with open_store(postgres_url) as store:
        await store.write([msg(execution=execution)])
        postgres_server.stop()
        try:
            with pytest.raises(BackendError):
                await store.write([msg(execution=execution)])
            with pytest.raises(BackendError):
                await store.ping()
        finally:
            postgres_server.start()
        # The pool replaces dead connections: the next calls work again.
        for _ in range(3):
            try:
                await store.ping()
                break
            except ConnectionLost:
                continue
        [stored] = await store.write([msg(execution=execution)])
        assert stored.seq == 2


async def test_two_processes_migrating_at_once(postgres_url: str) -> None:
    a, b = open_store(postgres_url), open_store(postgres_url)
    await asyncio.gather(a.open(), b.open())
    await a.close()
    await b.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_version") == len(POSTGRES_MIGRATIONS)
    finally:
        await conn.close()
