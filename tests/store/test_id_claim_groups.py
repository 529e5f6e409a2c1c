"""Id claims of many callers in one transaction (``ClaimsIdGroups``): each group decided on its own, in order."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.store import ClaimsIdGroups, IdClaim
from tests.store.suite import StoreFactory

RACES = 20


async def grouper(factory: StoreFactory) -> ClaimsIdGroups:
    store = await factory()
    assert isinstance(store, ClaimsIdGroups)
    return store


def claim(ident: uuid.UUID, sender: str = "pm", body: str = "one") -> IdClaim:
    return IdClaim(ident, sender, f"{sender}:{body}".encode())


class ClaimGroupsSuite:
    """Behaviour of ``claim_groups`` every engine must show; subclasses provide ``factory``."""

    async def test_a_refused_group_records_nothing_and_the_other_groups_hold(self, factory: StoreFactory) -> None:
        store = await grouper(factory)
        held, free, alone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await store.claim([claim(held, "dev-1")])
        refused = [claim(free), claim(held)]
        results = await store.claim_groups([refused, [claim(alone)]])
        assert results == [[claim(free), claim(held, "dev-1")], [claim(alone)]]
        # nothing of the refused group was recorded; the other group's claim was
        assert await store.claim([claim(free, "dev-1", "two")]) == [claim(free, "dev-1", "two")]
        assert await store.claim([claim(alone, "dev-1")]) == [claim(alone)]

    async def test_groups_are_decided_in_order_as_if_one_after_another(self, factory: StoreFactory) -> None:
        store = await grouper(factory)
        ident = uuid.uuid4()
        results = await store.claim_groups([[claim(ident)], [claim(ident, "dev-1")], [claim(ident)]])
        assert results == [[claim(ident)], [claim(ident)], [claim(ident)]]
        assert await store.claim([claim(ident, "dev-1")]) == [claim(ident)]

    async def test_an_id_named_first_by_a_refused_group_goes_to_a_later_group(self, factory: StoreFactory) -> None:
        store = await grouper(factory)
        held, ident = uuid.uuid4(), uuid.uuid4()
        await store.claim([claim(held, "dev-1")])
        results = await store.claim_groups([[claim(ident), claim(held)], [claim(ident, "dev-1", "two")]])
        assert results == [[claim(ident), claim(held, "dev-1")], [claim(ident, "dev-1", "two")]]
        assert await store.claim([claim(ident)]) == [claim(ident, "dev-1", "two")]

    async def test_every_group_refused_records_nothing(self, factory: StoreFactory) -> None:
        store = await grouper(factory)
        held, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await store.claim([claim(held, "dev-1")])
        results = await store.claim_groups([[claim(a), claim(held)], [claim(held, "pm", "x"), claim(b)]])
        assert results == [[claim(a), claim(held, "dev-1")], [claim(held, "dev-1"), claim(b)]]
        assert await store.claim_groups([[claim(a, "dev-1")], [claim(b, "dev-1")]]) == [
            [claim(a, "dev-1")], [claim(b, "dev-1")]]

    async def test_empty_groups(self, factory: StoreFactory) -> None:
        store = await grouper(factory)
        ident = uuid.uuid4()
        assert await store.claim_groups([]) == []
        assert await store.claim_groups([[], [claim(ident)], []]) == [[], [claim(ident)], []]

    async def test_two_stores_racing_groups_in_opposite_order_agree_and_do_not_deadlock(
        self, factory: StoreFactory
    ) -> None:
        one, two = await grouper(factory), await grouper(factory)
        for _ in range(RACES):
            ids = [uuid.uuid4() for _ in range(20)]
            # one names the ids last to first across its groups, two first to last
            groups_one = [[claim(i, "pm")] for i in reversed(ids)] + [[claim(i, "pm") for i in ids]]
            groups_two = [[claim(i, "dev-1")] for i in ids] + [[claim(i, "dev-1") for i in reversed(ids)]]
            got_one, got_two = await asyncio.gather(one.claim_groups(groups_one), two.claim_groups(groups_two))
            for index in range(len(ids)):
                [a] = got_one[len(ids) - 1 - index]
                [b] = got_two[index]
                assert a == b, "both stores name one holder of each id"
            # the batch of all ids holds only on the side that holds every single one
            for got, sender in ((got_one, "pm"), (got_two, "dev-1")):
                holds_all = all(g[0].sender_id == sender for g in got[:-1])
                assert all(h.sender_id == sender for h in got[-1]) == holds_all


class TestSqliteClaimGroups(ClaimGroupsSuite):
    @pytest.fixture
    def factory(self, sqlite_factory: StoreFactory) -> StoreFactory:
        return sqlite_factory


@pytest.mark.postgres
class TestPostgresClaimGroups(ClaimGroupsSuite):
    @pytest.fixture
    def factory(self, postgres_factory: StoreFactory) -> StoreFactory:
        return postgres_factory
