"""A stored row the service cannot read never breaks history, lookups, sends or streams (issue 16, High 2).

Rows like these come from older versions (metadata nested hundreds of levels
deep was accepted then) or from writing to the database by hand. The
service leaves such a row out: history pages skip it and ``next_cursor``
still moves past it, ``GET /v1/messages/{id}`` answers 404, an execution's
SSE stream sends a ``gap`` event with reason ``unreadable`` for its seq, and
sending the same id again answers with the stored seq instead of a 500.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import httpx
import pytest

from tests.service.conftest import MakeApp, asgi, message, read_events, served

# 100 levels: the JSON decoder reads it and the envelope's depth check refuses it;
# 5000 levels: past the JSON decoder's own recursion limit
DEPTHS = [100, 5000]


def _poison(store_url: str, message_id: str, depth: int) -> None:
    """Give the stored row of ``message_id`` metadata nested ``depth`` levels, as an old version stored it."""
    path = store_url.split(":///", 1)[1]
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        [(body,)] = conn.execute("SELECT body FROM messages WHERE id = ?", (uuid.UUID(message_id).bytes,))
        assert b'"metadata"' not in body and body.endswith(b"}")  # empty metadata is left out
        conn.execute("UPDATE messages SET body = ? WHERE id = ?",
                     (body[:-1] + b',"metadata":' + deep + b"}", uuid.UUID(message_id).bytes))
    finally:
        conn.close()


async def poison(store_url: str, message_id: str, depth: int) -> None:
    """:func:`_poison` off the event loop, so the service's own writes go on meanwhile."""
    await asyncio.to_thread(_poison, store_url, message_id, depth)


@pytest.fixture(params=DEPTHS, ids=[f"depth{d}" for d in DEPTHS])
def depth(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


async def _three(client: httpx.AsyncClient, execution: uuid.UUID) -> list[str]:
    ids = []
    for index in range(3):
        response = await client.post("/v1/messages", json=message(execution=execution, content=f"m{index}"))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def test_history_skips_the_row_and_pages_past_it(make_app: MakeApp, store_url: str, depth: int) -> None:
    execution = uuid.uuid4()
    async with asgi(make_app()) as api:
        ids = await _three(api.client, execution)
        await poison(store_url, ids[1], depth)
        for params in ({"task_execution_id": str(execution)}, {"agent_id": "pm"}, {}):
            response = await api.client.get("/v1/messages", params=params)
            assert response.status_code == 200, (params, response.text)
            assert [m["content"] for m in response.json()["items"]] == ["m0", "m2"]
            seen: list[str] = []
            cursor: str | None = None
            for _ in range(5):
                page = await api.client.get("/v1/messages", params={**params, "limit": 1,
                                                                     **({"cursor": cursor} if cursor else {})})
                assert page.status_code == 200, page.text
                seen += [m["content"] for m in page.json()["items"]]
                cursor = page.json()["next_cursor"]
                if cursor is None:
                    break
            assert seen == ["m0", "m2"] and cursor is None
        assert (await api.client.get(f"/v1/messages/{ids[1]}")).status_code == 404
        assert (await api.client.get(f"/v1/messages/{ids[2]}")).json()["content"] == "m2"


async def test_sending_the_id_again_answers_without_a_500(make_app: MakeApp, store_url: str, depth: int) -> None:
    execution = uuid.uuid4()
    async with asgi(make_app()) as api:
        ids = await _three(api.client, execution)
        await poison(store_url, ids[1], depth)
        again = await api.client.post("/v1/messages", json=message(execution=execution, content="m1", id=ids[1]))
        assert again.status_code in (200, 201), again.text
        assert (again.json()["id"], again.json()["seq"]) == (ids[1], 2)
        batch = await api.client.post("/v1/messages:batch", json={"messages": [
            message(execution=execution, content="m1", id=ids[1]),
            message(execution=execution, content="m3"),
        ]})
        assert batch.status_code == 200, batch.text
        assert [m["seq"] for m in batch.json()["items"]] == [2, 4]
        snapshot = (await api.client.get(f"/v1/executions/{execution}")).json()
        assert snapshot["message_count"] == 4


async def test_streams_get_a_gap_for_the_row(make_app: MakeApp, store_url: str, depth: int) -> None:
    execution = uuid.uuid4()
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        ids = await _three(client, execution)
        await poison(store_url, ids[1], depth)
        async with client.stream("GET", f"/v1/executions/{execution}/events") as response:
            events = await read_events(response, 4, timeout=5)
            assert [(e.event, e.id) for e in events] == [
                ("snapshot", None), ("message", "1"), ("gap", "2"), ("message", "3")]
            assert events[2].data == {"from_seq": 2, "to_seq": 2, "reason": "unreadable"}
            # live messages after it still arrive
            await client.post("/v1/messages", json=message(execution=execution, content="m3"))
            [live] = await read_events(response, 1, timeout=5)
            assert (live.event, live.id, live.data["content"]) == ("message", "4", "m3")
        async with client.stream("GET", f"/v1/executions/{execution}/events",
                                 headers={"Last-Event-ID": "1"}) as response:
            events = await read_events(response, 4, timeout=5)
            assert [(e.event, e.id) for e in events[1:]] == [("gap", "2"), ("message", "3"), ("message", "4")]
        async with client.stream("GET", "/v1/events") as response:
            events = await read_events(response, 4, timeout=5)
            assert [e.data["content"] for e in events[1:]] == ["m0", "m2", "m3"]


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_what_a_post_stores_it_can_answer_and_show(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        deepest = _nested(32)  # the deepest metadata the envelope accepts
        sent = await client.post("/v1/messages", json=message(execution=execution, metadata=deepest))
        assert sent.status_code == 201, sent.text
        assert sent.json()["metadata"] == deepest
        for bad in ({"metadata": _nested(33)}, {"metadata": {"x": float("inf")}}):
            refused = await client.post("/v1/messages", content=json.dumps(message(execution=execution, **bad)),
                                        headers={"Content-Type": "application/json"})
            assert refused.status_code == 422, refused.text
            batch = await client.post("/v1/messages:batch", content=json.dumps(
                {"messages": [message(execution=execution), message(execution=execution, **bad)]}),
                headers={"Content-Type": "application/json"})
            assert batch.status_code == 422, batch.text
        history = await client.get("/v1/messages", params={"task_execution_id": str(execution)})
        assert [m["metadata"] for m in history.json()["items"]] == [deepest]
        async with client.stream("GET", f"/v1/executions/{execution}/events") as response:
            [_, event] = await read_events(response, 2, timeout=5)
        assert event.data["metadata"] == deepest
