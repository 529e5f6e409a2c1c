"""Id claims (``ClaimsIds``) on both engines: atomic across store instances, all or nothing, kept until retention."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from squadbus.store import ClaimsIds, HistoryStore, IdClaim, open_store
from squadbus.store.migrations import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from tests.store.suite import StoreFactory, msg

RACES = 30


async def claimer(factory: StoreFactory) -> ClaimsIds:
    store = await factory()
    assert isinstance(store, ClaimsIds)
    return store


def claim(ident: uuid.UUID, sender: str = "pm", body: str = "one") -> IdClaim:
    return IdClaim(ident, sender, f"{sender}:{body}".encode())


class ClaimsSuite:
    """Behaviour of ``claim`` every engine must show; subclasses provide ``factory``."""

    async def test_first_claim_holds_and_the_same_message_may_claim_again(self, factory: StoreFactory) -> None:
        store = await claimer(factory)
        ident = uuid.uuid4()
        mine = claim(ident)
        assert await store.claim([mine]) == [mine]
        assert await store.claim([claim(ident)]) == [mine]  # a retry of the same message goes on
        other = claim(ident, "dev-1", "two")
        assert await store.claim([other]) == [mine]  # another message is shown the holder
        assert await store.claim([]) == []


    async def test_a_refused_call_records_nothing(self, factory: StoreFactory) -> None:
        store = await claimer(factory)
        held, free = uuid.uuid4(), uuid.uuid4()
        await store.claim([claim(held)])
        refused = await store.claim([claim(free, "dev-1"), claim(held, "dev-1")])
        assert refused == [claim(free, "dev-1"), claim(held)]
        # ``free`` was not recorded for dev-1: pm can take it now
        assert await store.claim([claim(free)]) == [claim(free)]


    async def test_an_id_repeated_in_one_call_keeps_its_first_claim(self, factory: StoreFactory) -> None:
        store = await claimer(factory)
        ident = uuid.uuid4()
        assert await store.claim([claim(ident), claim(ident, "dev-1")]) == [claim(ident), claim(ident)]


    async def test_two_stores_racing_on_one_id_agree_on_one_holder(self, factory: StoreFactory) -> None:
        one, two = await claimer(factory), await claimer(factory)
        for _ in range(RACES):
            ident = uuid.uuid4()
            a, b = claim(ident, "pm"), claim(ident, "dev-1")
            [got_a], [got_b] = await asyncio.gather(one.claim([a]), two.claim([b]))
            assert got_a == got_b
            assert got_a in (a, b)


    async def test_racing_batches_with_overlapping_ids_do_not_deadlock(self, factory: StoreFactory) -> None:
        one, two = await claimer(factory), await claimer(factory)
        for _ in range(10):
            ids = [uuid.uuid4() for _ in range(50)]
            a = [claim(i, "pm") for i in ids]
            b = [claim(i, "dev-1") for i in reversed(ids)]
            got_a, got_b = await asyncio.gather(one.claim(a), two.claim(b))
            # all or nothing: one batch holds every id
            holders = {h.sender_id for h in got_a} | {h.sender_id for h in got_b}
            assert len(holders) == 1, holders


    async def test_retention_removes_claims_with_the_messages(self, factory: StoreFactory) -> None:
        store = await factory()
        assert isinstance(store, ClaimsIds)
        old, stored = uuid.uuid4(), msg(id=uuid.uuid4())
        await store.claim([claim(old), claim(stored.id)])
        await store.write([stored])
        assert await store.delete_older_than(datetime.now(UTC) - timedelta(hours=1)) == 0
        assert await store.claim([claim(old, "dev-1")]) == [claim(old)]  # still held
        # the count is of messages only
        assert await store.delete_older_than(datetime.now(UTC) + timedelta(seconds=1)) == 1
        assert await store.claim([claim(old, "dev-1")]) == [claim(old, "dev-1")]
        assert await store.get(stored.id) is None


class TestSqliteClaims(ClaimsSuite):
    @pytest.fixture
    def factory(self, sqlite_factory: StoreFactory) -> StoreFactory:
        return sqlite_factory


@pytest.mark.postgres
class TestPostgresClaims(ClaimsSuite):
    @pytest.fixture
    def factory(self, postgres_factory: StoreFactory) -> StoreFactory:
        return postgres_factory


# ---- migration 2 on a database made by migration 1 ---------------------------------------------


async def _sqlite_v1(path: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)")
        for statement in SQLITE_MIGRATIONS[0][1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.close()


async def _versions_sqlite(path: str) -> list[int]:
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    conn.close()
    return versions


async def check_migration_2(url: str, versions: Callable[[], Awaitable[list[int]]]) -> None:
    assert await versions() == [1]
    stores: list[HistoryStore] = [open_store(url), open_store(url)]
    await asyncio.gather(*(s.open() for s in stores))  # two processes opening at once migrate once
    ident = uuid.uuid4()
    try:
        assert (await versions())[:2] == [1, 2]  # later migrations may follow
        one = stores[0]
        assert isinstance(one, ClaimsIds)
        assert await one.claim([claim(ident)]) == [claim(ident)]
        [row] = await one.write([msg(id=ident)])
        assert row.seq == 1
    finally:
        for s in stores:
            await s.close()
    async with open_store(url) as again:
        assert isinstance(again, ClaimsIds)
        assert await again.claim([claim(ident, "dev-1")]) == [claim(ident)]
    assert (await versions())[:2] == [1, 2]  # later migrations may follow


async def test_opening_a_version_1_sqlite_database_adds_the_claims_table_once(sqlite_url: str) -> None:
    path = sqlite_url.split(":///", 1)[1]
    await _sqlite_v1(path)
    await check_migration_2(sqlite_url, lambda: _versions_sqlite(path))


@pytest.mark.postgres
async def test_opening_a_version_1_postgres_database_adds_the_claims_table_once(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("CREATE TABLE schema_version (version integer PRIMARY KEY,"
                           " applied_at timestamptz NOT NULL DEFAULT now())")
        for statement in POSTGRES_MIGRATIONS[0][1]:
            await conn.execute(statement)
        await conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    finally:
        await conn.close()

    async def versions() -> list[int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            return [row[0] for row in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
        finally:
            await conn.close()

    await check_migration_2(postgres_url, versions)
