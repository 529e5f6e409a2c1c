"""Concurrent POSTs share one claim transaction, and each request's claims are still decided on their own.

The store's ``claim_groups`` is wrapped so the first call waits at a gate:
the requests sent meanwhile queue up and go to the store together in the
second call, which the test then checks was shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.settings import Settings
from squadbus.service.id_claims import fingerprint
from squadbus.service.routes_messages import to_message
from squadbus.service.schemas import MessageIn
from squadbus.store import ClaimsIdGroups, IdClaim
from tests.service.conftest import Api, MakeApp, asgi, message


@dataclass
class GatedClaims:
    """Once ``armed``, every ``claim_groups`` call's groups (as id lists); the first waits for ``gate``."""

    armed: bool = False
    calls: list[list[list[uuid.UUID]]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def app_with_gated_claims(make_app: MakeApp, **overrides: Any) -> AsyncIterator[tuple[Api, GatedClaims,
                                                                                            list[Message]]]:
    """One app on a memory bus whose store's claim_groups is gated; yields it, the gate and every publish."""
    bus = Bus.from_settings(Settings(url="memory://"))
    await bus.start()
    published: list[Message] = []
    publish_many = bus.publish_many

    async def recording(messages: Sequence[Message]) -> Sequence[Message]:
        published.extend(messages)
        return await publish_many(messages)

    bus.publish_many = recording  # type: ignore[method-assign]
    try:
        async with asgi(make_app(bus=bus, **overrides)) as api:
            store = api.service.store
            assert isinstance(store, ClaimsIdGroups)
            gated = GatedClaims()
            claim_groups = store.claim_groups

            async def gated_claim_groups(groups: Sequence[Sequence[IdClaim]]) -> list[list[IdClaim]]:
                if gated.armed:
                    gated.calls.append([[c.id for c in group] for group in groups])
                    if len(gated.calls) == 1:
                        await gated.gate.wait()
                return await claim_groups(groups)

            store.claim_groups = gated_claim_groups  # type: ignore[method-assign]
            yield api, gated, published
    finally:
        await bus.close()


async def wait_for(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def claim_for(api: Api, body: dict[str, Any]) -> str:
    """Claim ``body``'s id in the store for it, as another replica would; returns the sender holding the id."""
    store = api.service.store
    assert isinstance(store, ClaimsIdGroups)
    sent = to_message(MessageIn(**body), api.service)
    [held] = await store.claim([IdClaim(sent.id, sent.sender_id, fingerprint(sent))])
    return held.sender_id


async def in_one_claim_transaction(
    api: Api, gated: GatedClaims, requests: list[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    """POST each (path, body) while a blocker holds the claim flusher: they all queue for one shared call."""
    gated.armed = True
    blocker = asyncio.create_task(api.client.post("/v1/messages", json=message(id=str(uuid.uuid4()))))
    await wait_for(lambda: len(gated.calls) == 1, "the blocker's claim")
    tasks = []
    for index, (path, body) in enumerate(requests):
        tasks.append(asyncio.create_task(api.client.post(path, json=body)))
        await wait_for(lambda n=index + 1: api.service.writer.claims.queued == n, f"request {index} to queue")
    gated.gate.set()
    assert (await blocker).status_code == 201
    return list(await asyncio.gather(*tasks))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_choice(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Store URL override for make_app: the test's SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"store_url": request.getfixturevalue("postgres_url")}


async def test_a_refused_request_does_not_refuse_another_in_the_same_claim_transaction(
    make_app: MakeApp, store_choice: dict[str, Any]
) -> None:
    async with app_with_gated_claims(make_app, **store_choice) as (api, gated, published):
        taken, free = uuid.uuid4(), uuid.uuid4()
        await claim_for(api, message(sender="pm", id=str(taken), content="pm's"))
        refused, sent = await in_one_claim_transaction(api, gated, [
            ("/v1/messages", message(sender="dev-1", id=str(taken), content="dev-1's")),
            ("/v1/messages", message(sender="pm", id=str(free), content="goes on")),
        ])
        assert refused.status_code == 409
        assert "another sender" in refused.json()["detail"]
        assert sent.status_code == 201, sent.text
        assert [(m.id, m.content) for m in published if m.id in (taken, free)] == [(free, "goes on")]
        assert gated.calls[1] == [[taken], [free]], "both requests were claimed in one store call"
        assert await claim_for(api, message(sender="dev-1", id=str(free))) == "pm", "the claim was recorded"


async def test_a_partly_conflicting_batch_is_refused_whole_beside_a_single_post_that_goes_on(
    make_app: MakeApp, store_choice: dict[str, Any]
) -> None:
    async with app_with_gated_claims(make_app, **store_choice) as (api, gated, published):
        taken, free, single = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await claim_for(api, message(sender="pm", id=str(taken), content="pm's"))
        batch = {"messages": [message(sender="dev-1", id=str(free), content="a"),
                              message(sender="dev-1", id=str(taken), content="b")]}
        refused, sent = await in_one_claim_transaction(api, gated, [
            ("/v1/messages:batch", batch),
            ("/v1/messages", message(sender="pm", id=str(single), content="single")),
        ])
        assert refused.status_code == 409
        assert sent.status_code == 201, sent.text
        assert [m.id for m in published if m.id in (taken, free, single)] == [single]
        assert gated.calls[1] == [[free, taken], [single]], "the batch and the single POST shared one store call"
        assert await claim_for(api, message(sender="dev-1", id=str(single))) == "pm", "the claim was recorded"
        # nothing of the refused batch was claimed: another sender may use its free id
        ok = await api.client.post("/v1/messages", json=message(sender="pm", id=str(free), content="pm's now"))
        assert ok.status_code == 201, ok.text
