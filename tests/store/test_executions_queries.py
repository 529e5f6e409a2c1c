"""The execution and agent lists of both stores (ListsExecutions): order, pages, filters, retention."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest

from squadbus.core import envelope, subjects
from squadbus.core.envelope import Message
from squadbus.store import (
    AgentQuery,
    ExecutionQuery,
    ExecutionSummary,
    HistoryStore,
    InvalidQuery,
    ListsExecutions,
    open_store,
)
from squadbus.store.base import LISTED
from tests.store.suite import StoreFactory

ENGINES = ["sqlite_factory", "postgres_factory"]


def msg(sender: str, recipient: str | None, execution: uuid.UUID | None, *, message_type: str = "message",
        domain: str | None = None, content: str = "hi") -> Message:
    if recipient is not None:
        subject = subjects.direct(recipient)
    else:
        subject = subjects.BROADCAST if domain is None else subjects.domain(domain)
    return envelope.build(subject=subject, sender_id=sender, recipient_id=recipient, content=content,
                          message_type=message_type, domain=domain, task_execution_id=execution)


@pytest.fixture(params=ENGINES)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    make: StoreFactory = request.getfixturevalue(request.param)
    return make


@pytest.fixture
async def store(factory: StoreFactory) -> ListsExecutions:
    opened = await factory()
    assert isinstance(opened, ListsExecutions)
    return opened


async def all_executions(store: ListsExecutions, limit: int, **filters: object) -> list[ExecutionSummary]:
    items: list[ExecutionSummary] = []
    cursor = None
    for _ in range(1000):
        page = await store.list_executions(ExecutionQuery(cursor=cursor, limit=limit, **filters))  # type: ignore[arg-type]
        assert len(page.items) <= limit
        items += page.items
        cursor = page.next_cursor
        if cursor is None:
            return items
    raise AssertionError("pagination does not end")


async def write(store: ListsExecutions, messages: Sequence[Message]) -> None:
    assert isinstance(store, HistoryStore)
    await store.write(messages)


async def test_empty_store_lists_nothing(store: ListsExecutions) -> None:
    assert (await store.list_executions(ExecutionQuery())).items == []
    assert (await store.list_executions(ExecutionQuery())).next_cursor is None
    page = await store.list_agents(AgentQuery())
    assert page.items == [] and page.next_cursor is None


async def test_executions_newest_activity_first_with_their_summary(store: ListsExecutions) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await write(store, [msg("pm", "dev-1", a, message_type="task")])
    await write(store, [msg("pm", "dev-2", b), msg("dev-2", None, b, domain="dev", message_type="status")])
    await write(store, [msg("sales", None, None)])  # no execution: not listed
    await write(store, [msg("dev-1", "pm", a, message_type="result")])  # a is now the newest
    await write(store, [msg("ops", "ops-2", c)])
    items = await all_executions(store, 100)
    assert [i.task_execution_id for i in items] == [c, a, b]
    by_id = {i.task_execution_id: i for i in items}
    assert by_id[a].message_count == 2
    assert by_id[a].agents == ["dev-1", "pm"] and by_id[a].agent_count == 2
    assert by_id[a].message_types == ["result", "task"] and by_id[a].message_type_count == 2
    assert by_id[b].agents == ["dev-2", "pm"]  # a domain broadcast names no recipient
    assert by_id[a].first_activity_at < by_id[a].last_activity_at
    assert by_id[c].last_activity_at >= by_id[a].last_activity_at >= by_id[b].last_activity_at


async def test_summary_caps_agents_and_types_but_counts_them(store: ListsExecutions) -> None:
    e = uuid.uuid4()
    await write(store, [msg(f"agent-{n:02}", None, e, message_type=f"type-{n:02}") for n in range(LISTED + 5)])
    [item] = (await store.list_executions(ExecutionQuery())).items
    assert item.agents == [f"agent-{n:02}" for n in range(LISTED)]
    assert item.agent_count == LISTED + 5 and item.message_type_count == LISTED + 5
    assert len(item.message_types) == LISTED and item.message_count == LISTED + 5


async def test_pages_visit_every_execution_once(store: ListsExecutions) -> None:
    executions = [uuid.uuid4() for _ in range(23)]
    # one batch: every execution has the same last activity, so the id breaks the ties
    await write(store, [msg("pm", "dev-1", e) for e in executions[:11]])
    for e in executions[11:]:
        await write(store, [msg("pm", "dev-1", e)])
    for limit in (1, 4, 7, 23, 100):
        items = await all_executions(store, limit)
        ids = [i.task_execution_id for i in items]
        assert len(ids) == len(set(ids)) == 23, limit
        assert ids[:12] == executions[:10:-1]
        assert ids[12:] == sorted(executions[:11], key=str, reverse=True)


async def test_execution_filters(store: ListsExecutions) -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await write(store, [msg("pm", "dev-1", a, message_type="task")])
    await write(store, [msg("dev-2", None, b, message_type="status")])
    await write(store, [msg("qa", "pm", c, message_type="task")])
    middle = (await store.list_executions(ExecutionQuery(id_prefix=str(b)))).items[0].last_activity_at

    async def ids(**filters: object) -> set[uuid.UUID]:
        return {i.task_execution_id for i in await all_executions(store, 2, **filters)}

    assert await ids(agent_id="pm") == {a, c}  # as sender and as recipient
    assert await ids(agent_id="dev-2") == {b}
    assert await ids(agent_id="nobody") == set()
    assert await ids(message_type="task") == {a, c}
    assert await ids(message_type="task", agent_id="qa") == {c}
    assert await ids(id_prefix=str(a)) == {a}
    assert await ids(id_prefix=str(a)[:8]) == {e for e in (a, b, c) if str(e).startswith(str(a)[:8])}
    assert await ids(id_prefix=str(a).replace("-", "")) == set()  # a prefix of the text form, with dashes
    assert await ids(since=middle) == {b, c}
    assert await ids(until=middle) == {a}
    assert await ids(since=middle, until=middle + timedelta(microseconds=1)) == {b}


@pytest.mark.parametrize("bad", [
    ExecutionQuery(limit=0), ExecutionQuery(limit=501), ExecutionQuery(id_prefix="xyz"),
    ExecutionQuery(id_prefix="A" * 37), ExecutionQuery(cursor="bm9wZQ"), ExecutionQuery(cursor="!!"),
    ExecutionQuery(since=datetime(2025, 1, 1)),  # naive: refused
])
async def test_bad_execution_queries_are_refused(store: ListsExecutions, bad: ExecutionQuery) -> None:
    with pytest.raises(InvalidQuery):
        await store.list_executions(bad)


async def test_an_agent_cursor_is_no_execution_cursor(store: ListsExecutions) -> None:
    await write(store, [msg("a", "b", None), msg("c", "d", None)])
    cursor = (await store.list_agents(AgentQuery(limit=1))).next_cursor
    assert cursor is not None
    with pytest.raises(InvalidQuery):
        await store.list_executions(ExecutionQuery(cursor=cursor))
    exec_cursor = base64.urlsafe_b64encode(b"e1:5:" + uuid.uuid4().hex.encode()).decode().rstrip("=")
    with pytest.raises(InvalidQuery):
        await store.list_agents(AgentQuery(cursor=exec_cursor))


async def test_retention_removes_executions_with_no_rows_left(store: ListsExecutions) -> None:
    old, new = uuid.uuid4(), uuid.uuid4()
    await write(store, [msg("pm", "dev-1", old)])
    await write(store, [msg("pm", "dev-1", new)])
    cutoff = (await store.list_executions(ExecutionQuery(id_prefix=str(new)))).items[0].last_activity_at
    assert isinstance(store, HistoryStore)
    assert await store.delete_older_than(cutoff) == 1
    assert [i.task_execution_id for i in await all_executions(store, 10)] == [new]
    await write(store, [msg("pm", "dev-1", old)])  # active again
    assert [i.task_execution_id for i in await all_executions(store, 10)] == [old, new]


async def test_agents_with_counts_domain_and_last_activity(store: ListsExecutions) -> None:
    e = uuid.uuid4()
    await write(store, [msg("pm", "dev-1", e), msg("pm", "dev-2", e)])
    await write(store, [msg("dev-1", None, e, domain="dev"), msg("dev-1", "pm", e)])
    await write(store, [msg("sales-1", None, None)])
    page = await store.list_agents(AgentQuery())
    assert page.next_cursor is None
    by_id = {a.agent_id: a for a in page.items}
    assert [a.agent_id for a in page.items] == ["dev-1", "dev-2", "pm", "sales-1"]
    assert (by_id["pm"].messages_sent, by_id["pm"].messages_received) == (2, 1)
    assert (by_id["dev-1"].messages_sent, by_id["dev-1"].messages_received) == (2, 1)
    assert (by_id["dev-2"].messages_sent, by_id["dev-2"].messages_received) == (0, 1)
    assert by_id["dev-1"].domain == "dev"
    assert by_id["pm"].domain is None and by_id["dev-2"].domain is None
    assert by_id["sales-1"].last_activity_at > by_id["pm"].last_activity_at
    assert by_id["pm"].last_activity_at == by_id["dev-1"].last_activity_at  # received in the same write


async def test_agent_pages_and_prefix(store: ListsExecutions) -> None:
    names = [f"dev-{n:02}" for n in range(15)] + [f"ops-{n}" for n in range(4)] + ["dev", "devops"]
    await write(store, [msg(n, "ops-9" if i % 2 else None, None) for i, n in enumerate(names)])
    everyone = sorted({*names, "ops-9"})
    for prefix, expected in (("", everyone), ("dev-", [n for n in everyone if n.startswith("dev-")]),
                             ("ops", [n for n in everyone if n.startswith("ops")]), ("zzz", [])):
        for limit in (1, 3, 50):
            seen: list[str] = []
            cursor = None
            while True:
                page = await store.list_agents(AgentQuery(prefix=prefix, cursor=cursor, limit=limit))
                assert len(page.items) <= limit
                seen += [a.agent_id for a in page.items]
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert seen == expected, (prefix, limit)


async def test_migration_fills_the_list_from_existing_history(sqlite_url: str) -> None:
    """A database of version 2 (before the list) gets its executions listed after the upgrade."""
    import sqlite3

    store = open_store(sqlite_url)
    await store.open()
    a, b = uuid.uuid4(), uuid.uuid4()
    await store.write([msg("pm", "dev-1", a)])
    await store.write([msg("pm", "dev-1", b)])
    await store.close()
    with sqlite3.connect(sqlite_url.split(":///", 1)[1]) as db:  # back to version 2, columns emptied
        db.execute("UPDATE exec_counters SET task_execution_id = NULL, last_at = NULL")
        db.execute("DROP INDEX exec_counters_activity")
        db.execute("DROP INDEX messages_execution_type")
        db.execute("ALTER TABLE exec_counters DROP COLUMN task_execution_id")
        db.execute("ALTER TABLE exec_counters DROP COLUMN last_at")
        db.execute("DROP TABLE IF EXISTS dead_letters")  # a later migration, undone with the rest
        db.execute("DELETE FROM schema_version WHERE version >= 3")
    store = open_store(sqlite_url)
    await store.open()
    try:
        assert isinstance(store, ListsExecutions)
        assert [i.task_execution_id for i in (await store.list_executions(ExecutionQuery())).items] == [b, a]
    finally:
        await store.close()
