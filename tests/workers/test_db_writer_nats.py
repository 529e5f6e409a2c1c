"""The db-writer on NATS JetStream (pull consumer, batches gathered and decoded ahead of the
handler, acks sent after each commit by a task): every message once, in order, every ack at the server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

import nats
from squadbus.backends.nats.settings import DEFAULT_STREAM
from squadbus.core import envelope
from squadbus.core.backend import durable_name
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.store import HistoryQuery, HistoryStore, StoredMessage, open_store
from squadbus.workers.db_writer import GROUP, PATTERNS, DbWriter
from tests.store.test_db_writer import eventually

EXECUTIONS = 5


def backlog(count: int) -> list[Message]:
    executions = [uuid.uuid4() for _ in range(EXECUTIONS)]
    return [envelope.build(subject=f"agent.message.dev-{i % 3}", sender_id="pm", recipient_id=f"dev-{i % 3}",
                           content=f"m{i}", task_execution_id=executions[i % EXECUTIONS]) for i in range(count)]


async def stored(store: HistoryStore) -> list[StoredMessage]:
    rows: list[StoredMessage] = []
    cursor = None
    while True:
        page = await store.query(HistoryQuery(cursor=cursor, limit=1000))
        rows += page.items
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


def assert_once_in_order(rows: list[StoredMessage], sent: list[Message]) -> None:
    assert sorted(r.message.id for r in rows) == sorted(m.id for m in sent)
    position = {m.id: i for i, m in enumerate(sent)}
    by_execution: dict[uuid.UUID | None, list[tuple[int, int]]] = {}
    for row in rows:
        by_execution.setdefault(row.message.task_execution_id, []).append((row.seq, position[row.message.id]))
    for pairs in by_execution.values():
        assert [p for _, p in sorted(pairs)] == sorted(p for _, p in pairs), "rows out of publish order"


async def consumer_counts(url: str) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the db-writer's consumer, read from the server."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(DEFAULT_STREAM, durable_name(GROUP, PATTERNS[0]))
        return info.num_pending or 0, info.num_ack_pending or 0
    finally:
        await nc.close()


async def test_a_backlog_is_written_once_in_order_and_every_batch_acked(nats_url: str, tmp_path: Path) -> None:
    sent = backlog(300)
    async with Bus.from_url(nats_url) as bus, open_store(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}") as store:
        await bus.publish_many(sent)
        writer = DbWriter(bus, store, batch_size=25, max_wait=0.01)
        await writer.start()
        try:
            await eventually(lambda: writer.stats.messages >= len(sent))
        finally:
            await writer.stop()
        assert writer.stats.batches >= len(sent) // 25
        assert_once_in_order(await stored(store), sent)
    # ack_wait is 30 s: an ack lost or never sent would keep a message pending at the server.
    await eventually(lambda: _all_acked(nats_url), within=5.0)


@pytest.mark.postgres
async def test_a_backlog_into_postgresql_in_parallel_parts_is_written_once_in_order(
    nats_url: str, postgres_url: str
) -> None:
    sent = backlog(400)
    async with Bus.from_url(nats_url) as bus, open_store(f"{postgres_url}?parallel_writes=2") as store:
        await bus.publish_many(sent)
        writer = DbWriter(bus, store, batch_size=50, max_wait=0.01)
        assert writer.parallel_writes == 2  # from the store URL: two parts of each batch written at once
        await writer.start()
        try:
            await eventually(lambda: writer.stats.messages >= len(sent))
        finally:
            await writer.stop()
        assert_once_in_order(await stored(store), sent)
    await eventually(lambda: _all_acked(nats_url), within=5.0)


async def _all_acked(url: str) -> bool:
    return await consumer_counts(url) == (0, 0)


class GatedStore:
    """A store whose second write waits for ``release``; counts the writes it was asked for."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self.writes = 0
        self.in_second = asyncio.Event()
        self.release = asyncio.Event()

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        self.writes += 1
        if self.writes == 2:
            self.in_second.set()
            await self.release.wait()
        return await self.store.write(messages)


async def test_stop_during_a_write_gives_back_the_batch_decoded_ahead(nats_url: str, tmp_path: Path) -> None:
    sent = backlog(200)
    async with Bus.from_url(nats_url) as bus, open_store(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}") as store:
        await bus.publish_many(sent)
        gated = GatedStore(store)
        first = DbWriter(bus, gated, batch_size=20, max_wait=0.01)  # type: ignore[arg-type]
        await first.start()
        await asyncio.wait_for(gated.in_second.wait(), 20)
        stopping = asyncio.create_task(first.stop())
        await asyncio.sleep(0.1)  # let stop() reach the subscription's close
        gated.release.set()
        await stopping
        # The batch in flight was committed and acked; the one decoded meanwhile was not written.
        assert (gated.writes, first.stats.messages) == (2, 40)
        second = DbWriter(bus, store, batch_size=20, max_wait=0.01)
        await second.start()
        try:
            # Within 10 s, well inside ack_wait (30 s): what the first writer held was given back, none
            # of it left pending at the server until ack_wait (it would then come after later messages).
            await eventually(lambda: first.stats.messages + second.stats.messages >= len(sent), within=10)
        finally:
            await second.stop()
        assert_once_in_order(await stored(store), sent)
    await eventually(lambda: _all_acked(nats_url), within=5.0)
