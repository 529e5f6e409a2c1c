"""The same service on a real PostgreSQL store (private cluster started by the session fixture)."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.service.conftest import MakeApp, message, read_events, served

pytestmark = pytest.mark.postgres


async def test_service_on_postgres(make_app: MakeApp, postgres_url: str) -> None:
    execution = uuid.uuid4()
    app = make_app(store_url=postgres_url)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=15) as c:
        ident = str(uuid.uuid4())
        first = await c.post("/v1/messages", json=message(execution=execution, id=ident))
        again = await c.post("/v1/messages", json=message(execution=execution, id=ident))
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        bodies = [message(execution=execution, content=f"m{i}") for i in range(1, 8)]
        assert (await c.post("/v1/messages:batch", json={"messages": bodies})).status_code == 200
        page = (await c.get("/v1/messages", params={"task_execution_id": str(execution), "limit": 5})).json()
        assert [m["seq"] for m in page["items"]] == [1, 2, 3, 4, 5]
        page2 = (await c.get("/v1/messages", params={"task_execution_id": str(execution), "limit": 5,
                                                     "cursor": page["next_cursor"]})).json()
        assert [m["seq"] for m in page2["items"]] == [6, 7, 8]
        assert (await c.get("/readyz")).status_code == 200
        async with c.stream("GET", f"/v1/executions/{execution}/events", headers={"Last-Event-ID": "6"}) as resp:
            events = await read_events(resp, 3)
            assert events[0].data["last_seq"] == 8
            await app.state.service.bus.send("pm", "dev-1", "via db-writer", task_execution_id=execution)
            live = await read_events(resp, 1)
        assert [e.id for e in events[1:] + live] == ["7", "8", "9"]
        assert live[0].data["content"] == "via db-writer"
