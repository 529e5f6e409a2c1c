"""``/v1/dead-letters``: a group that gives up on a message leaves a dead letter the keeper keeps; a viewer
lists it, an admin re-drives it (under a new id, delivered again to the group, recorded in the audit log)
or discards it; nobody re-drives it twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.errors import Reject
from squadbus.service.routes_dead_letters import REDRIVE_OF, REDRIVEN_BY, REDRIVEN_FROM
from tests.service.conftest import Api, MakeApp, asgi, auth, message

GROUP = "billing"


class FlakyGroup:
    """Consumer group ``billing`` on direct messages: rejects (dead-letters) every message whose content
    starts with "bad" until ``healed``, then records it."""

    def __init__(self) -> None:
        self.healed = False
        self.seen: list[Any] = []

    async def handle(self, delivery: Delivery) -> None:
        if delivery.message.content.startswith("bad") and not self.healed:
            raise Reject("cannot bill this")
        self.seen.append(delivery.message)


@pytest.fixture
async def flaky(make_app: MakeApp, tokens_file: Path) -> AsyncIterator[tuple[Api, FlakyGroup]]:
    async with asgi(make_app(tokens_file=tokens_file)) as api:
        group = FlakyGroup()
        await api.service.bus.subscribe("agent.message.>", group.handle, group=GROUP,
                                        options=ConsumerOptions(max_deliver=2, backoff_base=0.01))
        yield api, group


async def dead_letters(api: Api, want: int, **params: str) -> list[dict[str, Any]]:
    """The listed dead letters once there are ``want`` of them (the keeper works asynchronously)."""
    async with asyncio.timeout(20):
        while True:
            r = await api.client.get("/v1/dead-letters", params=params, headers=auth("viewer"))
            assert r.status_code == 200, r.text
            items: list[dict[str, Any]] = r.json()["items"]
            if len(items) >= want:
                return items
            await asyncio.sleep(0.02)


async def send_bad(api: Api, content: str = "bad invoice") -> dict[str, Any]:
    r = await api.client.post("/v1/messages", json=message(execution=uuid.uuid4(), content=content),
                              headers=auth("pm"))
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_dead_letter_is_listed_with_its_reason_attempts_and_original_subject(
        flaky: tuple[Api, FlakyGroup]) -> None:
    api, _ = flaky
    sent = await send_bad(api)
    [dead] = await dead_letters(api, 1)
    assert dead["group"] == GROUP
    assert dead["reason"] == "rejected: cannot bill this"
    assert dead["attempts"] == 1
    assert dead["original_subject"] == "agent.message.dev-1"
    assert dead["original_id"] == sent["id"]
    assert dead["state"] == "dead" and dead["redrivable"] is True
    assert dead["message"]["content"] == "bad invoice" and dead["message"]["subject"] == f"agent.dlq.{GROUP}"
    assert (await api.client.get("/v1/dead-letters", params={"group": "other"}, headers=auth("viewer"))).json() == {
        "items": [], "next_cursor": None}
    summary = (await api.client.get("/v1/dead-letters:summary", headers=auth("viewer"))).json()
    assert summary["total"] == 1 and summary["by_group"] == {GROUP: 1}
    # the history holds the original only, not the dead-letter copy
    history = (await api.client.get("/v1/messages", headers=auth("viewer"))).json()["items"]
    assert [m["id"] for m in history] == [sent["id"]]
    assert (await api.client.get("/v1/dead-letters", headers=auth("pm"))).status_code == 403


async def test_an_admin_redrives_under_a_new_id_once_and_it_is_delivered_again_and_audited(
        flaky: tuple[Api, FlakyGroup], tmp_path: Path) -> None:
    api, group = flaky
    sent = await send_bad(api)
    [dead] = await dead_letters(api, 1)
    path = f"/v1/dead-letters/{dead['id']}:redrive"
    refused = await api.client.post(path, headers=auth("viewer"))
    assert refused.status_code == 403
    assert refused.json()["detail"] == "viewer tokens cannot re-drive or discard dead letters (admin only)"
    assert (await api.client.post(path, headers=auth("pm"))).status_code == 403

    group.healed = True
    r = await api.client.post(path, headers=auth("admin"))
    assert r.status_code == 200, r.text
    [done] = r.json()["redriven"]
    assert done["dead_letter_id"] == dead["id"] and done["subject"] == "agent.message.dev-1"
    assert done["redriven_as"] != sent["id"]
    async with asyncio.timeout(20):
        while not group.seen:
            await asyncio.sleep(0.02)
    [again] = group.seen
    assert str(again.id) == done["redriven_as"] and again.content == "bad invoice"
    assert again.headers[REDRIVEN_FROM] == sent["id"] and again.headers[REDRIVE_OF] == dead["id"]
    assert again.headers[REDRIVEN_BY] == "admin"
    assert not any(k.startswith("dlq-") for k in again.headers)

    twice = await api.client.post(path, headers=auth("admin"))
    assert twice.status_code == 409 and "already re-driven" in twice.json()["detail"]
    assert (await api.client.get("/v1/dead-letters", headers=auth("viewer"))).json()["items"] == []
    [settled] = (await api.client.get("/v1/dead-letters", params={"state": "all"}, headers=auth("viewer"))).json()[
        "items"]
    assert settled["state"] == "redriven" and settled["settled_by"] == "admin"
    assert settled["redriven_as"] == done["redriven_as"]
    # the re-driven message is in the execution's history beside the original
    r = await api.client.get(f"/v1/messages/{done['redriven_as']}", headers=auth("viewer"))
    assert r.status_code == 200 and r.json()["task_execution_id"] == sent["task_execution_id"]

    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    actions = [x for x in lines if x.get("action")]
    assert actions == [{"logged_at": actions[0]["logged_at"], "action": "dead-letter-redrive", "by": "admin",
                        "role": "admin", "dead_letter_id": dead["id"], "group": GROUP, "original_id": sent["id"],
                        "redriven_as": done["redriven_as"], "subject": "agent.message.dev-1"}]


async def test_redrive_a_whole_group_and_discard(flaky: tuple[Api, FlakyGroup]) -> None:
    api, group = flaky
    for n in range(3):
        await send_bad(api, f"bad {n}")
    items = await dead_letters(api, 3)
    assert [i["message"]["content"] for i in items] == ["bad 2", "bad 1", "bad 0"]  # newest first
    discarded = await api.client.post(f"/v1/dead-letters/{items[0]['id']}:discard", headers=auth("admin"))
    assert discarded.status_code == 200 and discarded.json()["state"] == "discarded"
    assert (await api.client.post(f"/v1/dead-letters/{items[0]['id']}:discard",
                                  headers=auth("admin"))).status_code == 409
    assert (await api.client.post("/v1/dead-letters:redrive", params={"group": GROUP},
                                  headers=auth("viewer"))).status_code == 403
    group.healed = True
    r = await api.client.post("/v1/dead-letters:redrive", params={"group": GROUP}, headers=auth("admin"))
    assert r.status_code == 200, r.text
    assert [x["dead_letter_id"] for x in r.json()["redriven"]] == [items[2]["id"], items[1]["id"]]  # oldest first
    async with asyncio.timeout(20):
        while len(group.seen) < 2:
            await asyncio.sleep(0.02)
    assert sorted(m.content for m in group.seen) == ["bad 0", "bad 1"]
    assert (await api.client.get("/v1/dead-letters", headers=auth("viewer"))).json()["items"] == []
    missing = await api.client.post(f"/v1/dead-letters/{uuid.uuid4()}:redrive", headers=auth("admin"))
    assert missing.status_code == 404


async def test_pages_of_dead_letters(flaky: tuple[Api, FlakyGroup]) -> None:
    api, _ = flaky
    for n in range(5):
        await send_bad(api, f"bad {n}")
    await dead_letters(api, 5)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/v1/dead-letters", params=params, headers=auth("viewer"))).json()
        seen += [i["message"]["content"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"bad {n}" for n in range(4, -1, -1)]
