"""``GET /v1/events``: the squad-wide SSE stream by subject pattern, over real HTTP (uvicorn in this loop)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from squadbus import __version__
from squadbus.cli.api import SERVICE_HEADER, probe
from squadbus.core.bus import Bus
from squadbus.service.schemas import MessageOut
from tests.service.conftest import MakeApp, asgi, auth, message, read_events, served

EVENTS = "/v1/events"


async def test_every_matching_message_of_every_execution_then_live(make_app: MakeApp) -> None:
    one, two = uuid.uuid4(), uuid.uuid4()
    app = make_app()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        await c.post("/v1/messages", json=message(execution=one, content="a"))
        await c.post("/v1/messages", json=message(recipient_id="qa", content="not dev-1"))
        await c.post("/v1/messages", json=message(content="no execution"))
        await c.post("/v1/messages", json=message(execution=two, content="b"))
        async with c.stream("GET", EVENTS, params={"pattern": "agent.message.dev-1"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            first = await read_events(resp, 4)
            assert (first[0].event, first[0].id) == ("start", None)
            assert first[0].data["pattern"] == "agent.message.dev-1"
            assert set(first[1].data) == set(MessageOut.model_fields)  # the same shape as the REST API
            assert [(e.event, e.data["content"]) for e in first[1:]] == [
                ("message", "a"), ("message", "no execution"), ("message", "b")]
            ids = [int(e.id or 0) for e in first[1:]]
            assert ids == sorted(ids) and len(set(ids)) == 3  # global positions, not per-execution seqs
            bus: Bus = app.state.service.bus
            await bus.send("pm", "dev-1", "straight on the bus")  # stored by the db-writer, no execution
            await c.post("/v1/messages", json=message(execution=one, content="c"))
            live = await read_events(resp, 2)  # in stored order: the write-through may beat the db-writer
            assert {e.data["content"] for e in live} == {"straight on the bus", "c"}
            assert ids[-1] < int(live[0].id or 0) < int(live[1].id or 0)


async def test_resume_after_an_event_id_and_start_new(make_app: MakeApp) -> None:
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        for i in range(4):
            await c.post("/v1/messages", json=message(content=f"m{i}"))
        async with c.stream("GET", EVENTS) as resp:
            got = await read_events(resp, 3)
        resume = got[-1].id
        assert resume is not None
        async with c.stream("GET", EVENTS, headers={"Last-Event-ID": resume}) as resp:
            start, *rest = await read_events(resp, 3)
            assert start.data["after"] == int(resume)
            assert [e.data["content"] for e in rest] == ["m2", "m3"]
        async with c.stream("GET", EVENTS, params={"after": resume}) as resp:
            assert [e.data["content"] for e in (await read_events(resp, 2))[1:]] == ["m2"]
        async with c.stream("GET", EVENTS, params={"start": "new"}) as resp:
            start = (await read_events(resp, 1))[0]
            assert start.data["since"] is not None
            await c.post("/v1/messages", json=message(content="fresh"))
            [fresh] = await read_events(resp, 1)
            assert fresh.data["content"] == "fresh"
            assert int(fresh.id or 0) > int(resume)


async def test_a_cursor_older_than_retention_gets_a_gap(make_app: MakeApp) -> None:
    app = make_app()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        for i in range(3):
            await c.post("/v1/messages", json=message(content=f"old{i}"))
        async with c.stream("GET", EVENTS) as resp:
            old = await read_events(resp, 4)
        await app.state.service.store.delete_older_than(datetime.now(UTC) + timedelta(seconds=1))
        await c.post("/v1/messages", json=message(content="kept"))
        async with c.stream("GET", EVENTS, headers={"Last-Event-ID": old[1].id or ""}) as resp:
            _, gap, kept = await read_events(resp, 3)
        assert gap.event == "gap"
        assert gap.data == {"from_position": int(old[1].id or 0) + 1, "to_position": int(old[3].id or 0),
                            "reason": "retention"}
        assert gap.id == old[3].id
        assert kept.data["content"] == "kept"


async def test_patterns_outside_the_squad_and_bad_cursors_are_422(make_app: MakeApp) -> None:
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        for pattern in ("foo.>", "agent..x", "agent.>.x", ""):
            r = await c.get(EVENTS, params={"pattern": pattern})
            assert r.status_code == 422, (pattern, r.text)
        r = await c.get(EVENTS, headers={"Last-Event-ID": "seven"})
        assert r.status_code == 422


async def test_viewers_and_admins_may_follow_the_squad_agents_may_not(make_app: MakeApp, tokens_file: Path) -> None:
    async with served(make_app(tokens_file=tokens_file)) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        assert (await c.get(EVENTS)).status_code == 401
        assert (await c.get(EVENTS, headers=auth("dev-1"))).status_code == 403
        for who in ("viewer", "admin"):
            async with c.stream("GET", EVENTS, headers=auth(who)) as resp:
                assert resp.status_code == 200
                assert (await read_events(resp, 1))[0].event == "start"


async def test_healthz_names_the_service(make_app: MakeApp) -> None:
    async with served(make_app()) as url:
        assert await asyncio.to_thread(probe, url, 30.0)  # a blocking client: not on this loop, which serves
        # something answering is not enough: it must carry the squadbus header
        assert not await asyncio.to_thread(probe, f"{url}/v1/messages/", 30.0)
    async with asgi(make_app()) as running:
        r = await running.client.get("/healthz")
    assert r.headers[SERVICE_HEADER] == __version__


@pytest.mark.postgres
async def test_the_squad_stream_on_postgres(make_app: MakeApp, postgres_url: str) -> None:
    async with served(make_app(store_url=postgres_url)) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        await c.post("/v1/messages", json=message(content="before", execution=uuid.uuid4()))
        async with c.stream("GET", EVENTS) as resp:
            _, before = await read_events(resp, 2)
            await c.post("/v1/messages", json=message(content="after"))
            [after] = await read_events(resp, 1)
        assert (before.data["content"], after.data["content"]) == ("before", "after")
        assert int(before.id or 0) < int(after.id or 0)
        async with c.stream("GET", EVENTS, headers={"Last-Event-ID": before.id or ""}) as resp:
            assert [e.data["content"] for e in (await read_events(resp, 2))[1:]] == ["after"]
