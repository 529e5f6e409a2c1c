"""GET /v1/executions and GET /v1/agents on SQLite and PostgreSQL: order, pages, filters, roles, errors."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import Api, MakeApp, asgi, auth, message


@pytest.fixture(params=["sqlite", "postgres"])
def engine_url(request: pytest.FixtureRequest, store_url: str) -> str:
    """The test's SQLite file store, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return store_url


@pytest.fixture
async def engine_api(engine_url: str, make_app: MakeApp, tokens_file: Path) -> AsyncIterator[Api]:
    """A secure app (tokens required) on a SQLite file or a PostgreSQL database."""
    overrides: dict[str, Any] = {"tokens_file": tokens_file, "store_url": engine_url}
    async with asgi(make_app(**overrides)) as running:
        yield running


async def send(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/messages", json=message(**fields), headers=auth("admin"))
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def pages(client: httpx.AsyncClient, path: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query, headers=auth("viewer"))
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination does not end")


async def test_empty_store(engine_api: Api) -> None:
    for path in ("/v1/executions", "/v1/agents"):
        response = await engine_api.client.get(path, headers=auth("viewer"))
        body = response.json()
        body.pop("inboxes", None)  # agents: what the backend tells of inboxes
        assert body == {"items": [], "next_cursor": None}


async def test_executions_newest_first_across_pages(engine_api: Api) -> None:
    client = engine_api.client
    executions = [uuid.uuid4() for _ in range(7)]
    for e in executions:
        await send(client, execution=e)
    await send(client, execution=executions[2], sender="dev-1", recipient_id="pm", message_type="result")
    expected = [str(executions[2]), *(str(e) for e in reversed(executions) if e != executions[2])]
    for limit in (1, 3, 7, 50):
        items = await pages(client, "/v1/executions", limit=limit)
        assert [i["task_execution_id"] for i in items] == expected, limit
    [first] = (await client.get("/v1/executions", params={"limit": 1}, headers=auth("viewer"))).json()["items"]
    assert first["message_count"] == 2
    assert first["agents"] == ["dev-1", "pm"] and first["agent_count"] == 2
    assert first["message_types"] == ["message", "result"] and first["message_type_count"] == 2
    assert first["first_activity_at"] < first["last_activity_at"]


async def test_execution_filters(engine_api: Api) -> None:
    client = engine_api.client
    a, b = uuid.uuid4(), uuid.uuid4()
    await send(client, execution=a, recipient_id="qa", message_type="task")
    row = await send(client, execution=b, sender="dev-1", recipient_id="pm", message_type="status")
    assert await pages(client, "/v1/executions", agent="dev-1") == await pages(client, "/v1/executions", q=str(b))
    assert [i["task_execution_id"] for i in await pages(client, "/v1/executions", agent="pm")] == [str(b), str(a)]
    assert [i["task_execution_id"] for i in await pages(client, "/v1/executions", type="task")] == [str(a)]
    assert [i["task_execution_id"] for i in await pages(client, "/v1/executions", q=str(a)[:6].upper())] == [
        str(e) for e in (b, a) if str(e).startswith(str(a)[:6])]
    assert [i["task_execution_id"] for i in await pages(client, "/v1/executions", since=row["stored_at"])] == [str(b)]
    assert [i["task_execution_id"] for i in await pages(client, "/v1/executions", until=row["stored_at"])] == [str(a)]
    assert await pages(client, "/v1/executions", agent="nobody") == []


async def test_agents_list_with_prefix_and_pages(engine_api: Api) -> None:
    client = engine_api.client
    e = uuid.uuid4()
    await send(client, execution=e, sender="pm", recipient_id="dev-1")
    await send(client, execution=e, sender="dev-1", recipient_id=None, domain="dev")
    await send(client, execution=e, sender="dev-2", recipient_id="pm")
    for limit in (1, 2, 10):
        agents = await pages(client, "/v1/agents", limit=limit)
        assert [a["agent_id"] for a in agents] == ["dev-1", "dev-2", "pm"]
    by_id = {a["agent_id"]: a for a in agents}
    assert by_id["dev-1"] | {"last_activity_at": None} == {
        "agent_id": "dev-1", "domain": "dev", "last_activity_at": None, "messages_sent": 1, "messages_received": 1,
        "inbox": None, "inbox_holder": None, "inbox_since": None}
    assert (by_id["pm"]["messages_sent"], by_id["pm"]["messages_received"]) == (1, 1)
    assert [a["agent_id"] for a in await pages(client, "/v1/agents", q="dev-", limit=1)] == ["dev-1", "dev-2"]
    mine = (await client.get("/v1/messages", params={"agent_id": "dev-2"}, headers=auth("viewer"))).json()
    assert [m["sender_id"] for m in mine["items"]] == ["dev-2"]  # one agent's messages: the history endpoint


async def test_roles(engine_api: Api) -> None:
    client = engine_api.client
    await send(client, execution=uuid.uuid4())
    for path in ("/v1/executions", "/v1/agents"):
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers={"Authorization": "Bearer not-a-token"})).status_code == 401
        for who in ("viewer", "admin", "dev-1"):  # agent tokens read every execution, as the history does
            response = await client.get(path, headers=auth(who))
            assert response.status_code == 200 and len(response.json()["items"]) >= 1, (path, who)


@pytest.mark.parametrize("params", [
    {"cursor": "bm9wZQ"}, {"cursor": "djE6MTI"}, {"limit": 0}, {"limit": 501}, {"q": "xyz"},
    {"since": "2025-01-01T00:00:00"}, {"since": "1700000000"},
])
async def test_bad_execution_queries_are_422(engine_api: Api, params: dict[str, Any]) -> None:
    response = await engine_api.client.get("/v1/executions", params=params, headers=auth("viewer"))
    assert response.status_code == 422, response.text
    if "cursor" in params:
        [error] = response.json()["detail"]
        assert "invalid cursor" in error["msg"] and "next_cursor" in error["msg"]


async def test_a_cursor_of_the_other_list_is_422(engine_api: Api) -> None:
    client = engine_api.client
    await send(client, execution=uuid.uuid4(), sender="pm", recipient_id="dev-1")
    await send(client, execution=uuid.uuid4(), sender="pm", recipient_id="dev-1")
    agents = (await client.get("/v1/agents", params={"limit": 1}, headers=auth("viewer"))).json()
    runs = (await client.get("/v1/executions", params={"limit": 1}, headers=auth("viewer"))).json()
    bad = [("/v1/executions", agents["next_cursor"]), ("/v1/agents", runs["next_cursor"]),
           ("/v1/agents", "bm9wZQ")]
    for path, cursor in bad:
        response = await client.get(path, params={"cursor": cursor}, headers=auth("viewer"))
        assert response.status_code == 422, (path, response.text)
        assert "invalid cursor" in response.json()["detail"][0]["msg"]
