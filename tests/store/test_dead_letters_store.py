"""The dead-letter table on both engines: kept once per id, listed newest first by group and state,
settled once (compare-and-set), reopened after a failed publish, counted by group since a time."""

from __future__ import annotations

from datetime import timedelta

import pytest

from squadbus.core.backend import Delivery
from squadbus.core.dispatch import dead_letter_of
from squadbus.core.envelope import Message, utcnow
from squadbus.store.dead_letters import DeadLetterQuery, DeadLetterState, KeepsDeadLetters
from tests.store.suite import StoreFactory, msg


def dead(group: str, content: str) -> Message:
    delivery = Delivery(msg(content=content), attempt=3, group=group)
    return dead_letter_of(delivery, "max_deliver (3) reached; last: ValueError: no")


async def check(factory: StoreFactory) -> None:
    store = await factory()
    assert isinstance(store, KeepsDeadLetters)
    a, b, c = dead("billing", "a"), dead("billing", "b"), dead("mail", "c")
    assert await store.keep_dead_letters([a, b, msg()]) == 2  # not a dead letter: ignored
    assert await store.keep_dead_letters([a, c]) == 1  # a again: kept once
    page = await store.list_dead_letters(DeadLetterQuery())
    assert [d.message.id for d in page.items] == [c.id, b.id, a.id] and page.next_cursor is None
    first = await store.list_dead_letters(DeadLetterQuery(group="billing", limit=1))
    assert [d.message.id for d in first.items] == [b.id] and first.next_cursor is not None
    rest = await store.list_dead_letters(DeadLetterQuery(group="billing", limit=1, cursor=first.next_cursor))
    assert [d.message.id for d in rest.items] == [a.id] and rest.next_cursor is None
    got = await store.get_dead_letter(a.id)
    assert got is not None and got.message == a and got.state is DeadLetterState.DEAD
    assert (got.facts.group, got.facts.attempts, got.facts.original_subject) == ("billing", 3, "agent.message.dev")

    new_id = msg().id
    assert await store.settle_dead_letter(a.id, DeadLetterState.REDRIVEN, by="ops", redriven_as=new_id)
    assert not await store.settle_dead_letter(a.id, DeadLetterState.DISCARDED, by="other")
    got = await store.get_dead_letter(a.id)
    assert got is not None and got.state is DeadLetterState.REDRIVEN
    assert (got.settled_by, got.redriven_as) == ("ops", new_id) and got.settled_at is not None
    assert [d.message.id for d in (await store.list_dead_letters(DeadLetterQuery())).items] == [c.id, b.id]
    assert await store.reopen_dead_letter(a.id, new_id)
    assert not await store.reopen_dead_letter(a.id, new_id)
    assert await store.settle_dead_letter(b.id, DeadLetterState.DISCARDED, by="ops")
    states = {d.message.id: d.state for d in (await store.list_dead_letters(DeadLetterQuery(state=None))).items}
    assert states == {a.id: DeadLetterState.DEAD, b.id: DeadLetterState.DISCARDED, c.id: DeadLetterState.DEAD}
    assert await store.dead_letter_counts(utcnow() - timedelta(hours=1)) == {"billing": 2, "mail": 1}
    assert await store.dead_letter_counts(utcnow() + timedelta(seconds=1)) == {}


async def test_sqlite(sqlite_factory: StoreFactory) -> None:
    await check(sqlite_factory)


@pytest.mark.postgres
async def test_postgres(postgres_factory: StoreFactory) -> None:
    await check(postgres_factory)


async def retention(factory: StoreFactory) -> None:
    store = await factory()
    assert isinstance(store, KeepsDeadLetters)
    await store.keep_dead_letters([dead("billing", "old")])
    await store.delete_older_than(utcnow() + timedelta(seconds=1))
    assert (await store.list_dead_letters(DeadLetterQuery(state=None))).items == []


async def test_retention_removes_dead_letters_sqlite(sqlite_factory: StoreFactory) -> None:
    await retention(sqlite_factory)


@pytest.mark.postgres
async def test_retention_removes_dead_letters_postgres(postgres_factory: StoreFactory) -> None:
    await retention(postgres_factory)
