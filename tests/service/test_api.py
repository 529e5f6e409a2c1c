"""REST API over ASGI: send, idempotency, batch, history filters and pagination, health, OpenAPI."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from squadbus.core.backend import Delivery
from tests.service.conftest import Api, MakeApp, asgi, message


async def test_post_returns_stored_message_with_seq(api: Api) -> None:
    execution = uuid.uuid4()
    r = await api.client.post("/v1/messages", json=message(execution=execution, message_type="task",
                                                           metadata={"k": [1, 2]}))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["seq"] == 1
    assert body["subject"] == "agent.message.dev-1"
    assert body["metadata"] == {"k": [1, 2]}
    assert body["stored_at"] is not None
    got = await api.client.get(f"/v1/messages/{body['id']}")
    assert got.status_code == 200
    assert got.json() == body


async def test_post_reaches_the_bus(api: Api) -> None:
    seen: list[str] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.message.content)
        done.set()

    await api.service.bus.subscribe("agent.message.dev-1", handler)
    r = await api.client.post("/v1/messages", json=message(content="over the bus"))
    assert r.status_code == 201
    await asyncio.wait_for(done.wait(), 5)
    assert seen == ["over the bus"]


async def test_same_id_is_idempotent(api: Api) -> None:
    execution = uuid.uuid4()
    ident = str(uuid.uuid4())
    published: list[str] = []

    async def handler(delivery: Delivery) -> None:
        published.append(str(delivery.message.id))

    await api.service.bus.subscribe("agent.message.>", handler)
    first = await api.client.post("/v1/messages", json=message(execution=execution, id=ident))
    again = await api.client.post("/v1/messages", json=message(execution=execution, id=ident, content="changed"))
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == first.json()
    await asyncio.sleep(0.2)  # the db-writer also stores it: a no-op
    page = (await api.client.get("/v1/messages", params={"task_execution_id": str(execution)})).json()
    assert [m["id"] for m in page["items"]] == [ident]
    assert published == [ident]  # the repeat was not published again


async def test_reused_id_of_another_sender_conflicts(api: Api) -> None:
    ident = str(uuid.uuid4())
    assert (await api.client.post("/v1/messages", json=message(id=ident))).status_code == 201
    r = await api.client.post("/v1/messages", json=message(sender="intruder", id=ident))
    assert r.status_code == 409


async def test_batch_in_order_with_duplicates(api: Api) -> None:
    execution = uuid.uuid4()
    ident = str(uuid.uuid4())
    first = await api.client.post("/v1/messages", json=message(execution=execution, id=ident, content="m0"))
    assert first.json()["seq"] == 1
    batch = [message(execution=execution, id=ident, content="m0")]
    batch += [message(execution=execution, content=f"m{i}", id=str(uuid.uuid4())) for i in range(1, 5)]
    batch.append(batch[2])  # repeated inside the batch
    r = await api.client.post("/v1/messages:batch", json={"messages": batch})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [m["content"] for m in items] == ["m0", "m1", "m2", "m3", "m4", "m2"]
    assert [m["seq"] for m in items] == [1, 2, 3, 4, 5, 3]


async def test_batch_is_validated_before_anything_is_sent(api: Api) -> None:
    execution = uuid.uuid4()
    batch = [message(execution=execution), message(execution=execution, sender_id="bad id")]
    r = await api.client.post("/v1/messages:batch", json={"messages": batch})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][:3] == ["body", "messages", 1]
    page = (await api.client.get("/v1/messages", params={"task_execution_id": str(execution)})).json()
    assert page["items"] == []


async def test_filters_and_cursor_pagination(api: Api) -> None:
    execution, other = uuid.uuid4(), uuid.uuid4()
    base = datetime.now(UTC)
    bodies = [message(sender="pm" if i % 2 else "dev-2", recipient_id="dev-1" if i % 3 else "qa",
                      execution=execution, message_type="task" if i % 4 == 0 else "note", content=f"c{i}")
              for i in range(25)]
    r = await api.client.post("/v1/messages:batch", json={"messages": bodies})
    assert r.status_code == 200
    await api.client.post("/v1/messages", json=message(execution=other))

    seen: list[str] = []
    cursor = None
    while True:
        params = {"task_execution_id": str(execution), "limit": 7}
        if cursor:
            params["cursor"] = cursor
        page = (await api.client.get("/v1/messages", params=params)).json()
        seen += [m["content"] for m in page["items"]]
        assert all(m["stored_at"] for m in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"c{i}" for i in range(25)]

    tasks = (await api.client.get("/v1/messages", params={"task_execution_id": str(execution),
                                                          "message_type": "task"})).json()["items"]
    assert [m["content"] for m in tasks] == [f"c{i}" for i in range(0, 25, 4)]
    qa = (await api.client.get("/v1/messages", params={"agent_id": "qa",
                                                       "task_execution_id": str(execution)})).json()["items"]
    assert {m["recipient_id"] for m in qa} == {"qa"}
    later = (base + timedelta(hours=1)).isoformat()
    none = (await api.client.get("/v1/messages", params={"since": later})).json()["items"]
    assert none == []
    earlier = (await api.client.get("/v1/messages", params={"until": later, "limit": 1000})).json()["items"]
    assert len(earlier) == 26


async def test_bad_query_gets_422(api: Api) -> None:
    for params in ({"limit": 0}, {"limit": 5000}, {"cursor": "not-a-cursor!"}, {"since": "yesterday"},
                   {"task_execution_id": "nope"}, {"since": "2024-01-01T00:00:00"}):
        r = await api.client.get("/v1/messages", params=params)
        assert r.status_code == 422, (params, r.text)
        assert isinstance(r.json()["detail"], list)


async def test_snapshot_and_unknown_message(api: Api) -> None:
    execution = uuid.uuid4()
    await api.client.post("/v1/messages:batch", json={"messages": [
        message(execution=execution), message(sender="dev-1", recipient_id="pm", execution=execution)]})
    snap = (await api.client.get(f"/v1/executions/{execution}")).json()
    assert snap["message_count"] == 2
    assert snap["last_seq"] == 2
    assert snap["agents"] == ["dev-1", "pm"]
    assert (await api.client.get(f"/v1/messages/{uuid.uuid4()}")).status_code == 404


async def test_messages_published_on_the_bus_are_stored_by_the_db_writer(api: Api) -> None:
    execution = uuid.uuid4()
    await api.service.bus.send("pm", "dev-1", "direct on the bus", task_execution_id=execution)
    for _ in range(100):
        items = (await api.client.get("/v1/messages", params={"task_execution_id": str(execution)})).json()["items"]
        if items:
            break
        await asyncio.sleep(0.05)
    assert [m["content"] for m in items] == ["direct on the bus"]


async def test_health_ready_and_openapi(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok", "checks": {}}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"store": "ok", "bus": "ok"}
    spec = (await api.client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in ("/v1/messages", "/v1/messages:batch", "/v1/executions/{execution_id}/events", "/metrics",
                 "/healthz", "/readyz"):
        assert path in paths
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    page = await api.client.get("/")
    assert page.status_code == 200
    assert "EventSource" not in page.text and "/events" in page.text


async def test_readyz_is_503_when_the_store_is_gone(make_app: MakeApp) -> None:
    app = make_app(workers=())
    async with asgi(app) as running:
        await running.service.store.close()
        r = await running.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["store"] != "ok"
