"""History-store benchmark: db-writer throughput into a store, against the raw driver doing the same inserts.

``run(url=STORE_URL, count=N, rate=R)`` measures, on an already-running
database (``postgresql://...`` or ``sqlite+aiosqlite:///...``):

* ``db-writer``: N messages published on an in-process memory bus, consumed
  by :class:`~squadbus.workers.db_writer.DbWriter` (batched, ack after
  COMMIT), timed from the first publish until the last one is committed;
  latency is publish (or, with ``rate > 0``, the intended send time) to commit;
* ``store.write``: the same messages written by ``HistoryStore.write`` in
  batches, no bus (the store's own cost: dedupe lookup, seq counters);
* ``db-writer -> no-op store``: the same pipeline with a store that writes
  nothing: the ceiling the bus, dispatch and batching put on the db-writer
  in this process, whatever the database;
* the raw driver inserting the same rows (encoded bodies, precomputed seqs)
  in transactions of one batch: asyncpg ``executemany`` and ``COPY`` for
  PostgreSQL, ``executemany`` for SQLite.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

from squadbus.benchmarks.openloop import drive
from squadbus.benchmarks.stats import Result
from squadbus.core import envelope
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.store import HistoryStore, StoredMessage, open_store
from squadbus.workers.db_writer import DbWriter

BATCH = 500
CONTENT_BYTES = 256
EXECUTIONS = 100
_COLUMNS = ("id", "task_execution_id", "seq", "sender_id", "recipient_id", "message_type",
            "created_at", "stored_at", "body")


def make_messages(count: int, *, executions: int = EXECUTIONS, content_bytes: int = CONTENT_BYTES) -> list[Message]:
    """``count`` direct messages spread over ``executions`` executions."""
    ids = [uuid.uuid4() for _ in range(executions)]
    content = "x" * content_bytes
    return [
        envelope.build(
            subject=f"agent.message.dev-{i % 10}", sender_id=f"pm-{i % 7}", recipient_id=f"dev-{i % 10}",
            content=content, message_type="task", task_execution_id=ids[i % executions],
        )
        for i in range(count)
    ]


class NullStore:
    """A store whose writes do nothing (the bus-side ceiling of the db-writer)."""

    url = "null://"

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        now = envelope.utcnow()
        return [StoredMessage(seq=0, stored_at=now, message=m) for m in messages]


def engine_of(url: str) -> str:
    """``postgres`` or ``sqlite``."""
    return "sqlite" if url.startswith("sqlite") else "postgres"


async def bench_db_writer(store: HistoryStore, messages: Sequence[Message], rate: float, label: str) -> Result:
    """Publish ``messages`` on a memory bus and time until the db-writer committed all of them."""
    due: dict[uuid.UUID, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    written = 0

    async def on_written(rows: list[StoredMessage]) -> None:
        nonlocal written
        now = time.perf_counter()
        latencies.extend((now - due[row.message.id]) * 1000 for row in rows)
        written += len(rows)
        if written >= len(messages):
            done.set()

    async with Bus.from_url("memory://") as bus:
        writer = DbWriter(bus, store, batch_size=BATCH, on_written=on_written)
        await writer.start()
        start = time.perf_counter()
        if rate > 0:
            async def send(i: int, at: float) -> None:
                due[messages[i].id] = at
                await bus.publish(messages[i])

            await drive(rate, len(messages), send)
        else:
            for message in messages:
                due[message.id] = time.perf_counter()
                await bus.publish(message)
        await done.wait()
        seconds = time.perf_counter() - start
        await writer.stop()
    mode = f"open loop {rate:g}/s" if rate > 0 else "as fast as possible"
    return Result(f"db-writer -> {label}", len(messages), seconds, latencies,
                  notes=f"memory bus, batch {BATCH}, {mode}, latency publish->commit")


async def bench_store_write(store: HistoryStore, messages: Sequence[Message], label: str) -> Result:
    """``HistoryStore.write`` in batches of BATCH, no bus."""
    start = time.perf_counter()
    latencies: list[float] = []
    for i in range(0, len(messages), BATCH):
        t0 = time.perf_counter()
        await store.write(messages[i:i + BATCH])
        latencies.append((time.perf_counter() - t0) * 1000)
    return Result(f"store.write -> {label}", len(messages), time.perf_counter() - start, latencies,
                  notes=f"batch {BATCH}; latency per batch")


def _rows(messages: Sequence[Message], seqs: dict[uuid.UUID | None, int]) -> list[tuple[Any, ...]]:
    """Rows as the store lays them out, seqs counted on in ``seqs`` (raw-driver baselines)."""
    now = envelope.utcnow()
    rows = []
    for m in messages:
        seq = seqs[m.task_execution_id] = seqs.get(m.task_execution_id, 0) + 1
        rows.append((m.id, m.task_execution_id, seq, m.sender_id, m.recipient_id, m.message_type,
                     m.created_at, now, envelope.encode(m)))
    return rows


async def bench_raw_postgres(url: str, messages: Sequence[Message]) -> list[Result]:
    """asyncpg executemany and COPY of the same rows, one transaction per batch."""
    import asyncpg

    from squadbus.store.postgres import PostgresSettings

    conn = await asyncpg.connect(PostgresSettings.from_url(url).dsn)
    results = []
    try:
        half = len(messages) // 2
        seqs: dict[uuid.UUID | None, int] = {}  # one numbering for both halves: they share executions
        for name, chunk in (("executemany", messages[:half]), ("COPY", messages[half:])):
            start = time.perf_counter()
            rows = _rows(chunk, seqs)
            for i in range(0, len(rows), BATCH):
                async with conn.transaction():
                    if name == "COPY":
                        await conn.copy_records_to_table("messages", records=rows[i:i + BATCH], columns=_COLUMNS)
                    else:
                        await conn.executemany(
                            f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                            " ON CONFLICT (id) DO NOTHING",
                            rows[i:i + BATCH],
                        )
            results.append(Result(f"raw asyncpg {name} -> postgres", len(chunk), time.perf_counter() - start,
                                  notes=f"batch {BATCH}, precomputed seqs, no dedupe lookup"))
    finally:
        await conn.close()
    return results


async def bench_raw_sqlite(url: str, messages: Sequence[Message]) -> list[Result]:
    """aiosqlite executemany of the same rows, one transaction per batch, same pragmas as the store."""
    import aiosqlite

    from squadbus.store import _common as c
    from squadbus.store.sqlite import SqliteSettings

    settings = SqliteSettings.from_url(url)
    conn = await aiosqlite.connect(settings.path, isolation_level=None)
    try:
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {settings.synchronous}")
        start = time.perf_counter()
        rows = [
            (r[0].bytes, r[1].bytes, r[2], r[3], r[4], r[5], c.to_micros(r[6]), c.to_micros(r[7]), r[8])
            for r in _rows(messages, {})
        ]
        for i in range(0, len(rows), BATCH):
            await conn.execute("BEGIN IMMEDIATE")
            await conn.executemany(
                f"INSERT INTO messages ({', '.join(_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING",
                rows[i:i + BATCH],
            )
            await conn.execute("COMMIT")
        seconds = time.perf_counter() - start
    finally:
        await conn.close()
    return [Result("raw aiosqlite executemany -> sqlite", len(messages), seconds,
                   notes=f"batch {BATCH}, synchronous={settings.synchronous}, precomputed seqs")]


async def run(*, url: str, count: int, rate: float, label: str | None = None) -> list[Result]:
    """The db-writer, store.write and raw-driver lines against the store at ``url`` (see the module docstring)."""
    engine = engine_of(url)
    label = label or engine
    results: list[Result] = []
    async with open_store(url) as store:
        await store.write(make_messages(BATCH))  # warm up: pool, caches, statement plans
        results.append(await bench_db_writer(store, make_messages(count), rate, label))
        results.append(await bench_store_write(store, make_messages(count), label))
    ceiling = await bench_db_writer(cast(HistoryStore, NullStore()), make_messages(count), rate, "no-op store")
    ceiling.notes = "bus + dispatch + batching only: " + ceiling.notes
    results.append(ceiling)
    raw = make_messages(count)
    if engine == "postgres":
        results += await bench_raw_postgres(url, raw)
    else:
        results += await bench_raw_sqlite(url, raw)
    for result in results:
        result.name = result.name.replace(f"-> {engine}", f"-> {label}", 1) if result.name.startswith("raw ") \
            else result.name
    return results
