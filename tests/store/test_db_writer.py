"""The db-writer on the memory bus, into both stores: exactly once, idempotent, no loss on store failure."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import pytest

from squadbus.core import envelope
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_ORIGINAL_ID
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, ConnectionLost
from squadbus.core.settings import Settings
from squadbus.store import HistoryQuery, HistoryStore, StoredMessage, open_store
from squadbus.testing.servers.postgres import PostgresServer
from squadbus.workers.base import Worker
from squadbus.workers.db_writer import DbWriter, split_by_execution
from squadbus.workers.registry import build_worker, worker_names
from tests.store.suite import StoreFactory


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_factory(request: pytest.FixtureRequest) -> StoreFactory:
    factory: StoreFactory = request.getfixturevalue(f"{request.param}_factory")
    return factory


@pytest.fixture
async def store(any_factory: StoreFactory) -> HistoryStore:
    return await any_factory()


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    # dedupe_window=0: the backend passes duplicate ids through, so the writer must drop them.
    async with Bus.from_url("memory://?dedupe_window=0") as bus:
        yield bus


async def eventually(check: Callable[[], object], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def all_rows(store: HistoryStore, agent: str) -> list[StoredMessage]:
    rows: list[StoredMessage] = []
    cursor = None
    while True:
        page = await store.query(HistoryQuery(agent_id=agent, cursor=cursor, limit=1000))
        rows += page.items
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


async def publish_mix(bus: Bus, sender: str, executions: Sequence[uuid.UUID], count: int) -> list[Message]:
    sent: list[Message] = []
    for i in range(count):
        execution = executions[i % len(executions)]
        if i % 10 == 3:
            sent.append(await bus.broadcast(sender, f"b{i}", task_execution_id=execution))
        else:
            sent.append(await bus.send(sender, f"dev-{i % 3}", f"m{i}", task_execution_id=execution))
    return sent


def assert_exactly_once(rows: list[StoredMessage], sent: list[Message]) -> None:
    ids = Counter(r.message.id for r in rows)
    assert set(ids) == {m.id for m in sent}
    assert max(ids.values()) == 1
    by_execution: dict[uuid.UUID | None, list[int]] = {}
    for row in rows:
        by_execution.setdefault(row.message.task_execution_id, []).append(row.seq)
    for seqs in by_execution.values():
        assert sorted(seqs) == list(range(1, len(seqs) + 1))


async def test_registry_builds_the_db_writer(bus: Bus, sqlite_factory: StoreFactory) -> None:
    assert "db-writer" in worker_names()
    worker = build_worker("db-writer", bus, await sqlite_factory(), Settings())
    assert isinstance(worker, Worker)
    assert worker.name == "db-writer"
    with pytest.raises(ValueError, match="unknown worker"):
        build_worker("nope", bus, await sqlite_factory(), Settings())


async def test_every_message_written_exactly_once(bus: Bus, store: HistoryStore) -> None:
    batches: list[list[StoredMessage]] = []

    async def on_written(rows: list[StoredMessage]) -> None:
        batches.append(rows)

    writer = DbWriter(bus, store, batch_size=100, max_wait=0.01, on_written=on_written)
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    executions = [uuid.uuid4() for _ in range(7)]
    sent = await publish_mix(bus, sender, executions, 1500)
    # Replies are history too.
    sent.append(await bus.publish(sent[0].evolve(id=uuid.uuid4(), subject="agent.reply.tok.x")))
    # Duplicates by id, published again later: ignored by the store.
    for message in sent[:50]:
        await bus.publish(message)
    await eventually(lambda: writer.stats.messages >= len(sent) + 50)
    await writer.stop()
    await writer.stop()  # idempotent
    rows = await all_rows(store, sender)
    assert_exactly_once(rows, sent)
    assert sum(len(b) for b in batches) == len(sent) + 50
    assert max(len(b) for b in batches) <= 100
    assert bus.stats.acked == len(sent) + 50
    assert bus.stats.dead_lettered == 0


async def test_dead_letters_are_acked_not_stored(bus: Bus, store: HistoryStore) -> None:
    writer = DbWriter(bus, store, batch_size=10, max_wait=0.01)
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    kept = await bus.send(sender, "dev-1", "stored")
    dead = await bus.publish(kept.evolve(id=uuid.uuid4(), subject="agent.dlq.some-group"))
    await eventually(lambda: bus.stats.acked >= 2)
    await writer.stop()
    assert [row.message.id for row in await all_rows(store, sender)] == [kept.id]
    assert await store.get(dead.id) is None
    assert writer.stats.messages == 1


class FlakyStore:
    """Wraps a store; ``write`` fails with ConnectionLost while ``down`` is set."""

    def __init__(self, inner: HistoryStore) -> None:
        self.inner = inner
        self.down = False
        self.failed = 0

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        if self.down:
            self.failed += 1
            raise ConnectionLost("injected outage")
        return await self.inner.write(messages)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_store_outage_loses_nothing(bus: Bus, store: HistoryStore) -> None:
    flaky = FlakyStore(store)
    writer = DbWriter(bus, flaky, batch_size=50, max_wait=0.01, retry_for=0.2)  # type: ignore[arg-type]
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    executions = [uuid.uuid4() for _ in range(3)]
    first = await publish_mix(bus, sender, executions, 200)
    await eventually(lambda: writer.stats.messages >= 200)
    flaky.down = True
    during = await publish_mix(bus, sender, executions, 300)
    await eventually(lambda: bus.stats.nacked > 0 and flaky.failed > 3)
    flaky.down = False
    await eventually(lambda: writer.stats.messages >= 500)
    await writer.stop()
    assert_exactly_once(await all_rows(store, sender), first + during)
    assert bus.stats.dead_lettered == 0


@pytest.mark.postgres
async def test_postgres_restart_mid_stream_loses_nothing(
    bus: Bus, postgres_server: PostgresServer, postgres_factory: StoreFactory
) -> None:
    store = await postgres_factory()
    writer = DbWriter(bus, store, batch_size=100, max_wait=0.01, retry_for=0.3)
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    executions = [uuid.uuid4() for _ in range(4)]
    sent = await publish_mix(bus, sender, executions, 300)
    await eventually(lambda: writer.stats.messages >= 300)
    postgres_server.stop()
    try:
        sent += await publish_mix(bus, sender, executions, 400)
        await eventually(lambda: writer.stats.store_failures > 0 and bus.stats.nacked > 0)
    finally:
        postgres_server.start()
    sent += await publish_mix(bus, sender, executions, 100)

    async def all_written() -> bool:
        return len(await all_rows(store, sender)) == len(sent)

    await eventually(all_written)
    await writer.stop()
    assert_exactly_once(await all_rows(store, sender), sent)
    assert bus.stats.dead_lettered == 0


async def test_poison_message_is_dead_lettered_and_the_rest_written(bus: Bus, store: HistoryStore) -> None:
    # A message the store refuses (a lone surrogate was one, until envelopes refused them at send): the
    # batch holding it is written one message at a time, the culprit dead-lettered, the rest stored.
    dead: list[Delivery] = []

    async def on_dlq(delivery: Delivery) -> None:
        dead.append(delivery)

    await bus.subscribe("agent.dlq.>", on_dlq, group="dlq-watch")
    writer = DbWriter(bus, RefusesOne(store, "cannot be stored"), batch_size=20, max_wait=0.05)  # type: ignore[arg-type]
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    execution = uuid.uuid4()
    good = [await bus.send(sender, "dev", f"ok {i}", task_execution_id=execution) for i in range(5)]
    poison = await bus.send(sender, "dev", "cannot be stored", task_execution_id=execution)
    good += [await bus.send(sender, "dev", f"ok {i}", task_execution_id=execution) for i in range(5, 10)]
    await eventually(lambda: len(dead) == 1)
    await eventually(lambda: writer.stats.messages >= 10)
    await writer.stop()
    assert dead[0].message.headers[DLQ_ORIGINAL_ID] == str(poison.id)
    assert_exactly_once(await all_rows(store, sender), good)


async def test_stop_finishes_in_flight_batches(bus: Bus, store: HistoryStore) -> None:
    writer = DbWriter(bus, store, batch_size=200, max_wait=0.5, options=ConsumerOptions(max_pending=100_000))
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    sent = await publish_mix(bus, sender, [uuid.uuid4()], 1000)
    await asyncio.sleep(0)  # let the first deliveries reach the batch
    await writer.stop()
    rows = await all_rows(store, sender)
    # Everything handed to the writer was committed before stop returned, and only that was acked.
    assert len(rows) == writer.stats.messages == bus.stats.acked
    assert bus.stats.nacked == 0
    assert_exactly_once(rows, sent[: len(rows)])
    # A new writer in the same group picks up the rest.
    second = DbWriter(bus, store, batch_size=200, max_wait=0.01)
    await second.start()

    async def rest_written() -> bool:
        return len(await all_rows(store, sender)) == len(sent)

    await eventually(rest_written)
    await second.stop()
    assert_exactly_once(await all_rows(store, sender), sent)


async def test_closed_store_does_not_lose_messages(bus: Bus, sqlite_url: str) -> None:
    store = open_store(sqlite_url)
    await store.open()
    writer = DbWriter(bus, store, batch_size=10, max_wait=0.01, retry_for=0.1)
    await writer.start()
    await store.close()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    sent = await publish_mix(bus, sender, [uuid.uuid4()], 20)
    await eventually(lambda: bus.stats.nacked >= 20)
    await writer.stop()
    assert bus.stats.dead_lettered == 0
    async with open_store(sqlite_url) as reopened:
        assert await all_rows(reopened, sender) == []
    assert len(sent) == 20


class _FaultyStore:
    """A store wrapper that injects faults into ``write`` (``state`` starts "armed", then the store is
    away for ``down_for`` writes) and passes everything else to ``inner``."""

    def __init__(self, inner: HistoryStore, down_for: int = 3) -> None:
        self.inner = inner
        self.down_for = down_for
        self.state = "armed"

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class RefusesOne(_FaultyStore):
    """Wraps a store: any write holding a message whose content is ``poison`` fails with a database error
    that is not a connection error (as a row the database cannot take would)."""

    def __init__(self, inner: HistoryStore, poison: str) -> None:
        super().__init__(inner)
        self.poison = poison

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        if any(m.content == self.poison for m in messages):
            raise BackendError("injected: invalid byte sequence for encoding \"UTF8\"")
        return await self.inner.write(messages)


class RefusesThenGoesAway(_FaultyStore):
    """Wraps a store: the first write of more than one message fails with a database error that is not
    a connection error, and the one-by-one writes the db-writer then tries reach the store once before it
    goes away (ConnectionLost) for ``down_for`` more writes; then the store is back."""

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        if self.state == "armed" and len(messages) > 2:
            self.state = "one-more"
            raise BackendError("injected: could not extend file: No space left on device")
        if self.state == "one-more":
            self.state = "down"
            return await self.inner.write(messages)
        if self.state == "down" and self.down_for > 0:
            self.down_for -= 1
            raise ConnectionLost("injected: the store went away during the one-by-one writes")
        return await self.inner.write(messages)


class FailsUnexpectedlyThenGoesAway(_FaultyStore):
    """Wraps a store: the first write of more than one message fails with an error outside the store's
    error tree (as asyncpg's ProtocolError or an AttributeError from a driver whose connection was killed
    mid-operation), then the store is away (ConnectionLost) for ``down_for`` writes, then back."""

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        if self.state == "armed" and len(messages) > 2:
            self.state = "down"
            raise RuntimeError("injected: the driver broke mid-write")
        if self.state == "down" and self.down_for > 0:
            self.down_for -= 1
            raise ConnectionLost("injected: the store is away")
        return await self.inner.write(messages)


@pytest.mark.parametrize("fault", ["refused-then-away", "unexpected-then-away"])
async def test_a_batch_failed_by_the_store_is_written_before_later_ones(
    bus: Bus, store: HistoryStore, fault: str
) -> None:
    """A batch whose write failed must be written before any later batch, whatever the failure.

    refused-then-away: the store refuses the batch, the db-writer writes it one message at a time to
    find the culprit, and the store goes away during that; nothing is blamed (the batch was given back
    instead, and its rows were stored after later messages of the execution).
    unexpected-then-away: the write fails with an error outside the store's error tree, as after a
    PostgreSQL kill -9 in tests/faults (rows of the batch in flight stored after later ones, nothing
    logged); it is retried in place like an outage.
    """
    flaky = RefusesThenGoesAway(store) if fault == "refused-then-away" else FailsUnexpectedlyThenGoesAway(store)
    writer = DbWriter(bus, flaky, batch_size=10, max_wait=0.05)  # type: ignore[arg-type]
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    execution = uuid.uuid4()
    await writer.start()
    sent = [await bus.send(sender, "dev-1", f"m{i}", task_execution_id=execution) for i in range(60)]

    async def all_written() -> bool:
        return len(await all_rows(store, sender)) == len(sent)

    await eventually(all_written)
    await writer.stop()
    assert flaky.state == "down" and flaky.down_for == 0, "the fault was not injected"
    rows = await all_rows(store, sender)
    assert_exactly_once(rows, sent)
    stored_order = [row.message.id for row in sorted(rows, key=lambda r: r.seq)]
    assert stored_order == [m.id for m in sent]
    assert bus.stats.dead_lettered == 0


def test_a_batch_splits_by_execution_each_part_in_order() -> None:
    executions = [uuid.uuid4() for _ in range(5)]
    # 12 messages of executions[0], 3 of each other, 4 with no execution, interleaved.
    order = [0] * 12 + [1, 2, 3, 4] * 3 + [None] * 4
    messages = [envelope.build(subject="agent.message.dev", sender_id="pm", recipient_id="dev", content=str(i),
                               task_execution_id=None if which is None else executions[which])
                for i, which in enumerate(order)]
    shuffled = [messages[i] for i in (0, 12, 1, 24, 13, 2, 14, 25, 3, 15, 4, 16, 5, 26, 17, 6, 18, 7, 19, 27, 8, 20,
                                      9, 21, 10, 22, 11, 23)]
    parts = split_by_execution(shuffled, 2)
    assert sorted(i for part in parts for i in part) == list(range(len(shuffled)))
    for part in parts:
        assert part == sorted(part)
    owner = {shuffled[i].task_execution_id: n for n, part in enumerate(parts) for i in part}
    for n, part in enumerate(parts):
        assert all(owner[shuffled[i].task_execution_id] == n for i in part)
    assert sorted(len(part) for part in parts) == [13, 15]  # 12, then 4 and 3 + 3 + 3 to the lighter, then 3
    assert split_by_execution(shuffled, 1) == [list(range(len(shuffled)))]
    assert len(split_by_execution(shuffled, 10)) == 6  # one part per execution at most
    one_execution = [m for m in shuffled if m.task_execution_id == executions[0]]
    assert split_by_execution(one_execution, 2) == [list(range(12))]


class ConcurrentStore:
    """Wraps a store: counts the writes in flight at once, and fails (ConnectionLost) every write that
    holds a message of execution ``down`` while it is set."""

    def __init__(self, inner: HistoryStore) -> None:
        self.inner = inner
        self.in_flight = 0
        self.most_in_flight = 0
        self.down: uuid.UUID | None = None
        self.failed = 0

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        if self.down is not None and any(m.task_execution_id == self.down for m in messages):
            self.failed += 1
            raise ConnectionLost("injected: this part's connection is down")
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)  # both parts are in the store at once
            return await self.inner.write(messages)
        finally:
            self.in_flight -= 1

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_parallel_writes_keep_each_execution_in_publish_order(bus: Bus, store: HistoryStore) -> None:
    concurrent = ConcurrentStore(store)
    batches: list[list[StoredMessage]] = []

    async def on_written(rows: list[StoredMessage]) -> None:
        batches.append(rows)

    writer = DbWriter(bus, concurrent, batch_size=60, max_wait=0.01, parallel_writes=2,  # type: ignore[arg-type]
                      on_written=on_written)
    await writer.start()
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    executions = [uuid.uuid4() for _ in range(5)]
    sent = await publish_mix(bus, sender, executions, 600)
    sent += [await bus.send(sender, "dev-1", f"none {i}") for i in range(20)]  # no execution: one sequence
    await eventually(lambda: writer.stats.messages >= len(sent))
    await writer.stop()
    assert concurrent.most_in_flight == 2
    rows = await all_rows(store, sender)
    assert_exactly_once(rows, sent)
    position = {m.id: i for i, m in enumerate(sent)}
    for execution in [*executions, None]:
        mine = sorted((r for r in rows if r.message.task_execution_id == execution), key=lambda r: r.seq)
        assert [position[r.message.id] for r in mine] == sorted(position[r.message.id] for r in mine)
    # on_written: once per batch, one row per message, each execution's rows in order.
    assert sum(len(b) for b in batches) == len(sent) == bus.stats.acked
    for batch in batches:
        seqs: dict[uuid.UUID | None, list[int]] = {}
        for row in batch:
            seqs.setdefault(row.message.task_execution_id, []).append(row.seq)
        assert all(s == sorted(s) for s in seqs.values())


async def test_a_failed_part_acks_only_what_was_stored(bus: Bus, store: HistoryStore) -> None:
    concurrent = ConcurrentStore(store)
    good, bad = uuid.uuid4(), uuid.uuid4()
    concurrent.down = bad
    writer = DbWriter(bus, concurrent, batch_size=50, max_wait=0.05, retry_for=0.1,  # type: ignore[arg-type]
                      parallel_writes=2)
    sender = f"pm-{uuid.uuid4().hex[:6]}"
    sent = []
    for i in range(20):
        for execution, name in ((good, "good"), (bad, "bad")):
            sent.append(envelope.build(subject="agent.message.dev-1", sender_id=sender, recipient_id="dev-1",
                                       content=f"{name} {i}", task_execution_id=execution))
    await bus.publish_many(sent)
    await writer.start()
    await eventually(lambda: bus.stats.nacked >= 20 and concurrent.failed >= 2)
    rows = await all_rows(store, sender)
    # The part that committed was acked; the failed one was given back, none of it acked or stored.
    assert {r.message.task_execution_id for r in rows} == {good}
    assert len(rows) == bus.stats.acked == writer.stats.messages == 20
    concurrent.down = None
    await eventually(lambda: writer.stats.messages >= len(sent))
    await writer.stop()
    rows = await all_rows(store, sender)
    assert_exactly_once(rows, sent)  # (given back after retry_for, a part's order is not kept: see DbWriter)
    assert bus.stats.acked == len(sent)
    assert bus.stats.dead_lettered == 0
