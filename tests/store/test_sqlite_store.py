"""The store suite on SQLite (file database, WAL), plus SQLite-only details."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from squadbus.core.errors import BackendError, ConfigError
from squadbus.store import open_store
from squadbus.store.migrations import SQLITE_MIGRATIONS
from squadbus.store.sqlite import SqliteSettings
from tests.store.suite import Corrupt, StoreFactory, StoreSuite, msg


class TestSqliteStore(StoreSuite):
    @pytest.fixture
    async def store_factory(self, sqlite_factory: StoreFactory) -> StoreFactory:
        return sqlite_factory

    @pytest.fixture
    def corrupt(self, sqlite_url: str) -> Corrupt:
        path = sqlite_url.split(":///", 1)[1]

        async def run(message_id: uuid.UUID) -> None:
            with sqlite3.connect(path) as conn:
                conn.execute("UPDATE messages SET body = ? WHERE id = ?", (b"{not json", message_id.bytes))
            conn.close()

        return run


def test_url_parsing(tmp_path: Path) -> None:
    assert SqliteSettings.from_url("sqlite+aiosqlite:///./squadbus.db").path == "./squadbus.db"
    assert SqliteSettings.from_url("sqlite+aiosqlite:////abs/x.db").path == "/abs/x.db"
    assert SqliteSettings.from_url("sqlite:///:memory:").in_memory
    assert SqliteSettings.from_url("sqlite+aiosqlite:///a.db?synchronous=full").synchronous == "FULL"
    for bad in ("sqlite+aiosqlite://host/x.db", "sqlite+aiosqlite:///", "sqlite:///a.db?nope=1",
                "sqlite:///a.db?synchronous=sometimes", "mysql://x"):
        with pytest.raises(ConfigError):
            SqliteSettings.from_url(bad)
    with pytest.raises(ConfigError):
        open_store("mysql://127.0.0.1/x")


async def test_in_memory_database() -> None:
    async with open_store("sqlite+aiosqlite:///:memory:") as store:
        execution = uuid.uuid4()
        stored = await store.write([msg(execution=execution), msg(execution=execution)])
        assert [s.seq for s in stored] == [1, 2]
        assert (await store.snapshot(execution)).last_seq == 2


async def test_reopen_keeps_history_and_migrations_are_idempotent(sqlite_url: str) -> None:
    execution = uuid.uuid4()
    async with open_store(sqlite_url) as store:
        await store.write([msg(execution=execution)])
    async with open_store(sqlite_url) as store:
        [second] = await store.write([msg(execution=execution)])
        assert second.seq == 2
    path = sqlite_url.split(":///", 1)[1]
    with sqlite3.connect(path) as conn:
        versions = [(version,) for version, _ in SQLITE_MIGRATIONS]
        assert conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall() == versions
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


@pytest.mark.parametrize("database", ["new", "rollback-journal"])
async def test_several_stores_opening_one_file_at_once_all_open(tmp_path: Path, database: str) -> None:
    """Switching a file to WAL takes an exclusive lock that SQLite refuses at once (no busy wait)
    when two connections would deadlock; several processes starting together must still all open."""
    for round_ in range(10):
        path = tmp_path / f"history-{round_}.db"
        if database == "rollback-journal":  # a file made by another tool, not yet in WAL
            with sqlite3.connect(path) as conn:
                conn.execute("CREATE TABLE t (x)")
            conn.close()
        stores = [open_store(f"sqlite+aiosqlite:///{path}") for _ in range(6)]
        try:
            await asyncio.gather(*(s.open() for s in stores))
            [first] = await stores[0].write([msg()])
            assert first.seq == 1
        finally:
            for s in stores:
                await s.close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


@pytest.mark.parametrize("stored_first", [False, True], ids=["fresh-batch", "batch-with-a-stored-id"])
async def test_a_refused_row_rolls_back_its_whole_batch(sqlite_url: str, stored_first: bool) -> None:
    """A batch is one transaction on the connection's thread, on the first attempt and on the one after an
    ignored (already stored) id: a row the database refuses leaves nothing of the batch and no seq used."""
    path = sqlite_url.split(":///", 1)[1]
    execution = uuid.uuid4()
    async with open_store(sqlite_url) as store:
        old = msg(execution=execution, content="old")
        if stored_first:
            await store.write([old])
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.sender_id = 'bad'"
                         " BEGIN SELECT RAISE(ABORT, 'refused'); END")
        conn.close()
        good = [msg(execution=execution, content=str(i)) for i in range(3)]
        with pytest.raises(BackendError, match="refused"):
            await store.write([old, good[0], msg("bad", execution=execution), good[1]])
        assert (await store.snapshot(execution)).message_count == (1 if stored_first else 0)
        stored = await store.write([old, *good])
        assert [s.seq for s in stored] == [1, 2, 3, 4]
        assert [r.message.id for r in await store.after(execution, 0)] == [old.id, *(m.id for m in good)]
