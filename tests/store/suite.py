"""One store test-suite, run unchanged against every engine.

A subclass provides two fixtures: ``store_factory`` (an async callable
returning a new, opened store on the test's own database; the suite closes
what it opens) and ``corrupt`` (an async callable overwriting the stored body
of one message id with bytes that are not an envelope).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from squadbus.core import envelope
from squadbus.core.envelope import Message
from squadbus.core.errors import Closed
from squadbus.store import HistoryQuery, HistoryStore, InvalidQuery, StoredMessage, position_cursor

StoreFactory = Callable[[], Awaitable[HistoryStore]]
Corrupt = Callable[[uuid.UUID], Awaitable[None]]


def msg(
    sender: str = "pm",
    recipient: str | None = "dev",
    *,
    execution: uuid.UUID | None = None,
    message_type: str = "message",
    content: str = "hello",
    created_at: datetime | None = None,
    id: uuid.UUID | None = None,
) -> Message:
    subject = f"agent.message.{recipient}" if recipient else "agent.message.broadcast"
    return envelope.build(
        subject=subject, sender_id=sender, recipient_id=recipient, content=content, message_type=message_type,
        task_execution_id=execution, created_at=created_at, id=id,
    )


class StoreSuite:
    """Behaviour every HistoryStore engine must show."""

    @pytest.fixture
    async def store(self, store_factory: StoreFactory) -> HistoryStore:
        return await store_factory()

    async def test_roundtrip_is_exact(self, store: HistoryStore) -> None:
        execution = uuid.uuid4()
        original = envelope.build(
            subject="agent.message.domain.dev", sender_id="pm", domain="dev", content="ünïcode \x00 nul",
            message_type="weird\x00type", task_execution_id=execution, metadata={"a": [1, {"b": None}]},
            headers={"traceparent": "00-abc-def-01"},
        )
        [stored] = await store.write([original])
        assert stored.seq == 1
        assert stored.message == original
        assert stored.stored_at.tzinfo is not None
        got = await store.get(original.id)
        assert got is not None
        assert got.message == original
        assert got.seq == 1
        assert abs((got.stored_at - stored.stored_at).total_seconds()) < 1e-3
        assert await store.get(uuid.uuid4()) is None

    async def test_write_is_idempotent_and_keeps_input_order(self, store: HistoryStore) -> None:
        execution = uuid.uuid4()
        a, b, c = (msg(execution=execution, content=str(i)) for i in range(3))
        first = await store.write([a, b])
        assert [s.seq for s in first] == [1, 2]
        again = await store.write([c, b, a, c])
        assert [s.message.id for s in again] == [c.id, b.id, a.id, c.id]
        assert [s.seq for s in again] == [3, 2, 1, 3]
        assert again[1].stored_at == first[1].stored_at
        # A different message under a used id: the stored one wins.
        clash = msg(execution=execution, content="impostor", id=a.id)
        [kept] = await store.write([clash])
        assert kept.message == a
        assert (await store.snapshot(execution)).message_count == 3
        assert await store.write([]) == []

    async def test_seq_is_per_execution_and_continuous(self, store: HistoryStore) -> None:
        x, y = uuid.uuid4(), uuid.uuid4()
        batch = [msg(execution=x), msg(execution=y), msg(execution=None), msg(execution=x), msg(execution=None)]
        stored = await store.write(batch)
        first_none = stored[2].seq
        assert [s.seq for s in stored] == [1, 1, first_none, 2, first_none + 1]
        later = await store.write([msg(execution=y), msg(execution=x)])
        assert [s.seq for s in later] == [2, 3]
        assert [s.seq for s in await store.after(x, 0)] == [1, 2, 3]

    # (batches, own messages per batch, shared per batch): small batches take PostgreSQL's one-statement
    # upsert, large ones its COPY path; shared ids make writers meet the same message.
    @pytest.mark.parametrize(("batches", "own", "shared_per"), [(10, 5, 2), (4, 80, 25)])
    async def test_concurrent_writers_to_one_execution(
        self, store_factory: StoreFactory, batches: int, own: int, shared_per: int
    ) -> None:
        stores = [await store_factory() for _ in range(3)]
        execution = uuid.uuid4()
        shared = [msg(execution=execution, content=f"shared {i}") for i in range(batches * shared_per)]

        async def writer(store: HistoryStore, n: int) -> list[StoredMessage]:
            out: list[StoredMessage] = []
            for i in range(batches):
                batch = [msg(execution=execution, content=f"w{n} {i} {j}") for j in range(own)]
                out += await store.write([*batch, *shared[i * shared_per:(i + 1) * shared_per]])
            return out

        results = await asyncio.gather(*(writer(s, n) for n, s in enumerate(stores)))
        by_id: dict[uuid.UUID, int] = {}
        for result in results:
            for item in result:
                assert by_id.setdefault(item.message.id, item.seq) == item.seq
        assert len(by_id) == 3 * batches * own + len(shared)
        assert sorted(by_id.values()) == list(range(1, len(by_id) + 1))
        rows = await stores[0].after(execution, 0, limit=2000)
        assert [r.seq for r in rows] == list(range(1, len(by_id) + 1))

    async def test_large_batches_are_idempotent_with_dense_seqs(self, store: HistoryStore) -> None:
        # Batches this large take PostgreSQL's COPY path; a stored id in one sends it the careful way.
        x, y = uuid.uuid4(), uuid.uuid4()
        first = [msg(execution=x if i % 3 else y, content=f"a{i}") for i in range(150)]
        stored = await store.write(first)
        assert [s.message.id for s in stored] == [m.id for m in first]
        mixed = [*first[100:], *(msg(execution=x if i % 3 else y, content=f"b{i}") for i in range(100)), None]
        batch = [m for m in mixed if m is not None] + [msg(execution=None, content="no execution")]
        again = await store.write(batch)
        assert [s.message.id for s in again] == [m.id for m in batch]
        old = {s.message.id: s.seq for s in stored}
        assert all(s.seq == old[s.message.id] for s in again[:50])
        for execution in (x, y):
            rows = await store.after(execution, 0, limit=1000)
            assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
            sent = [m.id for m in [*first, *batch[50:]] if m.task_execution_id == execution]
            assert [r.message.id for r in rows] == sent
        assert await store.write(first) == stored  # all stored: nothing changes

    async def test_query_filters(self, store: HistoryStore) -> None:
        x = uuid.uuid4()
        t0 = datetime(2030, 1, 1, tzinfo=UTC)
        pm, dev, qa = (f"{name}-{uuid.uuid4().hex[:6]}" for name in ("pm", "dev", "qa"))
        kind = f"type-{uuid.uuid4().hex[:6]}"
        batch = [
            msg(pm, dev, execution=x, message_type=kind, created_at=t0),
            msg(dev, pm, execution=x, created_at=t0 + timedelta(minutes=1)),
            msg(qa, None, execution=None, message_type=kind, created_at=t0 + timedelta(minutes=2)),
            msg(pm, qa, execution=uuid.uuid4(), created_at=t0 + timedelta(minutes=3)),
        ]
        await store.write(batch)

        async def ids(**filters: object) -> list[uuid.UUID]:
            page = await store.query(HistoryQuery(**filters))  # type: ignore[arg-type]
            return [item.message.id for item in page.items]

        assert await ids(task_execution_id=x) == [batch[0].id, batch[1].id]
        assert await ids(agent_id=pm) == [batch[0].id, batch[1].id, batch[3].id]
        assert await ids(agent_id=qa) == [batch[2].id, batch[3].id]
        assert await ids(message_type=kind) == [batch[0].id, batch[2].id]
        assert await ids(agent_id=pm, message_type=kind) == [batch[0].id]
        window = {"since": t0 + timedelta(minutes=1), "until": t0 + timedelta(minutes=3)}
        assert await ids(**window) == [batch[1].id, batch[2].id]
        assert await ids(agent_id=dev, **window) == [batch[1].id]
        assert await ids(agent_id="nobody-at-all") == []

    async def test_cursor_pagination_has_no_gaps_or_repeats(self, store: HistoryStore) -> None:
        agent = f"pager-{uuid.uuid4().hex[:6]}"
        written: list[uuid.UUID] = []
        for i in range(5):
            batch = [msg(agent, "other", execution=uuid.uuid4() if j % 2 else None, content=f"{i}/{j}")
                     for j in range(11)]
            batch.insert(3, msg("other", "someone-else"))  # not matching: never returned
            stored = await store.write(batch)
            written += [s.message.id for s in stored if s.message.sender_id == agent]
        seen: list[uuid.UUID] = []
        cursor = None
        pages = 0
        while True:
            page = await store.query(HistoryQuery(agent_id=agent, limit=7, cursor=cursor))
            pages += 1
            assert len(page.items) <= 7
            seen += [item.message.id for item in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == written
        assert pages == 8  # 55 rows / 7
        # Exactly a multiple of the limit: the last full page says there is nothing more.
        page = await store.query(HistoryQuery(agent_id=agent, limit=55))
        assert len(page.items) == 55
        assert page.next_cursor is None

    async def test_rows_read_back_carry_their_global_position(self, store: HistoryStore) -> None:
        agent = f"pos-{uuid.uuid4().hex[:6]}"
        written = await store.write([msg(agent, "a", execution=uuid.uuid4() if i % 2 else None, content=str(i))
                                     for i in range(6)])
        assert all(row.position is None for row in written)
        rows = (await store.query(HistoryQuery(agent_id=agent))).items
        positions = [row.position for row in rows]
        assert all(isinstance(p, int) for p in positions)
        assert positions == sorted(positions) and len(set(positions)) == 6
        first = rows[0]
        got = await store.get(first.message.id)
        assert got is not None and got.position == first.position
        # a position is a history cursor: "after this row"
        after = await store.query(HistoryQuery(agent_id=agent, cursor=position_cursor(rows[2].position or 0)))
        assert [row.message.content for row in after.items] == ["3", "4", "5"]
        from_start = await store.query(HistoryQuery(agent_id=agent, cursor=position_cursor(0)))
        assert [row.message.id for row in from_start.items] == [row.message.id for row in rows]

    async def test_bad_queries_are_rejected(self, store: HistoryStore) -> None:
        for bad in ("not-a-cursor", "", "djE6LTE"):  # the last is "v1:-1"
            with pytest.raises(InvalidQuery):
                await store.query(HistoryQuery(cursor=bad))
        with pytest.raises(InvalidQuery):
            await store.query(HistoryQuery(limit=0))
        with pytest.raises(InvalidQuery):
            await store.query(HistoryQuery(limit=1001))
        with pytest.raises(ValueError):
            await store.query(HistoryQuery(since=datetime(2030, 1, 1)))

    async def test_after(self, store: HistoryStore) -> None:
        x = uuid.uuid4()
        await store.write([msg(execution=x, content=str(i)) for i in range(10)])
        await store.write([msg(execution=uuid.uuid4())])
        assert [s.seq for s in await store.after(x, 0)] == list(range(1, 11))
        assert [s.seq for s in await store.after(x, 7)] == [8, 9, 10]
        assert [s.seq for s in await store.after(x, 2, limit=3)] == [3, 4, 5]
        assert [s.message.content for s in await store.after(x, 8)] == ["8", "9"]
        assert await store.after(x, 10) == []
        assert await store.after(uuid.uuid4(), 0) == []

    async def test_snapshot(self, store: HistoryStore) -> None:
        x = uuid.uuid4()
        empty = await store.snapshot(x)
        assert (empty.message_count, empty.first_seq, empty.last_seq, empty.agents) == (0, 0, 0, [])
        assert empty.last_message_at is None
        t0 = datetime(2030, 5, 1, tzinfo=UTC)
        await store.write([
            msg("pm", "dev", execution=x, created_at=t0),
            msg("dev", "qa", execution=x, created_at=t0 + timedelta(seconds=5)),
            msg("zed", None, execution=x, created_at=t0 + timedelta(seconds=2)),
        ])
        snap = await store.snapshot(x)
        assert snap.task_execution_id == x
        assert (snap.message_count, snap.first_seq, snap.last_seq) == (3, 1, 3)
        assert snap.agents == ["dev", "pm", "qa", "zed"]
        assert snap.last_message_at == t0 + timedelta(seconds=5)

    async def test_retention_deletes_old_rows_and_reveals_the_gap(self, store: HistoryStore) -> None:
        x = uuid.uuid4()
        old = await store.write([msg(execution=x) for _ in range(4)])
        cutoff = max(s.stored_at for s in old) + timedelta(microseconds=1)
        await asyncio.sleep(0.02)  # the next batch is stored strictly after the cutoff
        new = await store.write([msg(execution=x) for _ in range(3)])
        assert min(s.stored_at for s in new) >= cutoff
        assert await store.delete_older_than(cutoff) >= 4
        assert await store.get(old[0].message.id) is None
        snap = await store.snapshot(x)
        assert (snap.message_count, snap.first_seq, snap.last_seq) == (3, 5, 7)
        assert [s.seq for s in await store.after(x, 0)] == [5, 6, 7]
        # Seqs are never reused after retention.
        [latest] = await store.write([msg(execution=x)])
        assert latest.seq == 8
        assert await store.delete_older_than(cutoff) == 0

    async def test_malformed_rows_never_crash_a_read(self, store: HistoryStore, corrupt: Corrupt) -> None:
        x = uuid.uuid4()
        agent = f"agent-{uuid.uuid4().hex[:6]}"
        stored = await store.write([msg(agent, execution=x, content=str(i)) for i in range(4)])
        await corrupt(stored[1].message.id)
        assert await store.get(stored[1].message.id) is None
        assert [s.seq for s in await store.after(x, 0)] == [1, 3, 4]
        page = await store.query(HistoryQuery(agent_id=agent, limit=2))
        assert [s.seq for s in page.items] == [1]
        assert page.next_cursor is not None
        rest = await store.query(HistoryQuery(agent_id=agent, limit=2, cursor=page.next_cursor))
        assert [s.seq for s in rest.items] == [3, 4]
        assert (await store.snapshot(x)).message_count == 4
        # Rewriting the corrupted id is still a duplicate, not a new row.
        [again] = await store.write([stored[1].message])
        assert again.seq == 2

    async def test_reads_bounded_in_bytes(self, store: HistoryStore) -> None:
        x = uuid.uuid4()
        agent = f"agent-{uuid.uuid4().hex[:6]}"
        stored = await store.write([msg(agent, execution=x, content=str(i) * 1000) for i in range(5)])
        size = len(envelope.encode(stored[0].message))
        budget = 2 * size + size // 2  # two bodies fit, three do not
        assert [s.seq for s in await store.after(x, 0, max_bytes=budget)] == [1, 2]
        assert [s.seq for s in await store.after(x, 2, max_bytes=1)] == [3]  # at least one row
        assert [s.seq for s in await store.after(x, 3, 1, max_bytes=budget)] == [4]
        assert len(await store.after(x, 0, max_bytes=10**9)) == 5
        seen: list[int] = []
        cursor = None
        for _ in range(5):
            page = await store.query(HistoryQuery(agent_id=agent, limit=3, max_bytes=budget, cursor=cursor))
            assert 1 <= len(page.items) <= 2
            seen += [s.seq for s in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == [1, 2, 3, 4, 5] and cursor is None
        one = await store.query(HistoryQuery(agent_id=agent, limit=3, max_bytes=1))
        assert [s.seq for s in one.items] == [1] and one.next_cursor is not None
        whole = await store.query(HistoryQuery(agent_id=agent, limit=5, max_bytes=10**9))
        assert len(whole.items) == 5 and whole.next_cursor is None
        with pytest.raises(InvalidQuery):
            await store.query(HistoryQuery(max_bytes=0))

    async def test_ping_open_close(self, store_factory: StoreFactory) -> None:
        store = await store_factory()
        assert isinstance(store, HistoryStore)
        await store.ping()
        await store.open()  # idempotent
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(Closed):
            await store.write([msg()])
        with pytest.raises(Closed):
            await store.get(uuid.uuid4())
