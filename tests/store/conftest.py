"""Fixtures of the store tests: SQLite files in tmp dirs, one private PostgreSQL cluster per session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from squadbus.store import HistoryStore, open_store
from tests.store.suite import StoreFactory


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"


async def _factory(url: str) -> AsyncIterator[StoreFactory]:
    opened: list[HistoryStore] = []

    async def make() -> HistoryStore:
        store = open_store(url)
        await store.open()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
async def sqlite_factory(sqlite_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on the test's SQLite file; closes them after the test."""
    async for make in _factory(sqlite_url):
        yield make


@pytest.fixture
async def postgres_factory(postgres_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on the test's PostgreSQL database; closes them after the test."""
    async for make in _factory(postgres_url):
        yield make
