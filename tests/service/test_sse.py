"""SSE over real HTTP (uvicorn in this event loop): snapshot, live events, resume, gaps, slow viewers, replicas."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx

from squadbus.core.bus import Bus
from squadbus.service.schemas import MessageOut
from squadbus.store.base import open_store
from squadbus.workers.db_writer import DbWriter
from tests.service.conftest import MakeApp, message, read_events, served

EVENTS = "/v1/executions/{}/events"


async def post_many(client: httpx.AsyncClient, execution: uuid.UUID, n: int, start: int = 0) -> None:
    bodies = [message(execution=execution, content=f"m{i}") for i in range(start, start + n)]
    r = await client.post("/v1/messages:batch", json={"messages": bodies})
    assert r.status_code == 200, r.text


async def test_snapshot_then_history_then_live(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        await post_many(c, execution, 3)
        comments: list[str] = []
        async with c.stream("GET", EVENTS.format(execution)) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            first = await read_events(resp, 4)
            assert first[0].event == "snapshot"
            assert first[0].id is None
            assert first[0].data["message_count"] == 3 and first[0].data["last_seq"] == 3
            assert first[0].data["agents"] == ["dev-1", "pm"]
            assert set(first[1].data) == set(MessageOut.model_fields)  # the same shape as the REST API
            assert [(e.event, e.id, e.data["content"]) for e in first[1:]] == [
                ("message", "1", "m0"), ("message", "2", "m1"), ("message", "3", "m2")]
            await c.post("/v1/messages", json=message(execution=uuid.uuid4()))  # another execution: not shown
            await post_many(c, execution, 2, start=3)
            live = await read_events(resp, 2, comments=comments)
            assert [(e.id, e.data["content"], e.data["seq"]) for e in live] == [("4", "m3", 4), ("5", "m4", 5)]
        # heartbeats were comment lines
        async with c.stream("GET", EVENTS.format(execution), headers={"Last-Event-ID": "5"}) as resp:
            await read_events(resp, 1)
            await asyncio.sleep(0.8)
            await c.post("/v1/messages", json=message(execution=execution, content="after quiet"))
            quiet = await read_events(resp, 1, comments=comments)
            assert quiet[0].data["content"] == "after quiet"
        assert ": keepalive" in comments


async def test_bus_published_messages_reach_viewers(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    app = make_app()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        bus: Bus = app.state.service.bus
        async with c.stream("GET", EVENTS.format(execution)) as resp:
            assert (await read_events(resp, 1))[0].event == "snapshot"
            for i in range(5):
                await bus.send("pm", "dev-1", f"b{i}", task_execution_id=execution)
            events = await read_events(resp, 5)
            assert [e.data["content"] for e in events] == [f"b{i}" for i in range(5)]
            assert [e.id for e in events] == ["1", "2", "3", "4", "5"]


async def test_resume_with_last_event_id_loses_and_repeats_nothing(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    async with served(make_app()) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        await post_many(c, execution, 10)
        async with c.stream("GET", EVENTS.format(execution)) as resp:
            got = await read_events(resp, 5)
        last = got[-1].id
        assert last == "4"
        await post_many(c, execution, 5, start=10)
        async with c.stream("GET", EVENTS.format(execution), headers={"Last-Event-ID": last}) as resp:
            rest = await read_events(resp, 12)
        assert rest[0].event == "snapshot"
        assert [int(e.id or 0) for e in rest[1:]] == list(range(5, 16))
        async with c.stream("GET", EVENTS.format(execution), params={"after": 13}) as resp:
            tail = await read_events(resp, 3)
        assert [e.id for e in tail[1:]] == ["14", "15"]


async def test_gap_event_when_retention_removed_rows(make_app: MakeApp, store_url: str) -> None:
    execution = uuid.uuid4()
    app = make_app()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as c:
        await post_many(c, execution, 5)
        # The POST wrote the rows through; the db-writer writes them again (a no-op by id) when it
        # gets them from the bus. Let it, first: a db-writer lagging behind the delete below put
        # them back, and the delete's second chunk removed them again (removed == 10, now and then).
        writer = next(w for w in app.state.service.workers if isinstance(w, DbWriter))
        for _ in range(200):
            if writer.stats.messages >= 5:
                break
            await asyncio.sleep(0.02)
        assert writer.stats.messages >= 5
        store = open_store(store_url)
        await store.open()
        try:
            removed = await store.delete_older_than(datetime.now(UTC) + timedelta(seconds=1))
        finally:
            await store.close()
        assert removed == 5
        await post_many(c, execution, 2, start=5)
        async with c.stream("GET", EVENTS.format(execution), headers={"Last-Event-ID": "2"}) as resp:
            events = await read_events(resp, 4)
        assert events[0].event == "snapshot" and events[0].data["first_seq"] == 6
        assert (events[1].event, events[1].id) == ("gap", "5")
        assert events[1].data == {"from_seq": 3, "to_seq": 5, "reason": "retention"}
        assert [(e.event, e.id) for e in events[2:]] == [("message", "6"), ("message", "7")]


async def test_slow_viewer_catches_up_from_the_store(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    app = make_app(sse_queue_size=2)
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=20) as c:
        async with c.stream("GET", EVENTS.format(execution)) as slow, \
                c.stream("GET", EVENTS.format(execution)) as fast:
            await read_events(slow, 1)
            await read_events(fast, 1)
            for start in range(0, 60, 10):
                await post_many(c, execution, 10, start=start)
            fast_events = await read_events(fast, 60)
            await asyncio.sleep(0.3)  # the slow one has not read anything meanwhile
            slow_events = await read_events(slow, 60)
        hub = app.state.service.hub if app.state.service else None
        assert [e.id for e in fast_events] == [str(i) for i in range(1, 61)]
        assert [e.id for e in slow_events] == [str(i) for i in range(1, 61)]
        assert hub is not None and hub.stats.frames_dropped > 0 and hub.stats.viewer_catchups > 0


async def test_many_viewers_and_disconnects_cancel_nothing(make_app: MakeApp) -> None:
    execution = uuid.uuid4()
    app = make_app()
    async with served(app) as url, httpx.AsyncClient(base_url=url, timeout=20,
                                                     limits=httpx.Limits(max_connections=100)) as c:
        async def watch(n: int) -> list[str]:
            async with c.stream("GET", EVENTS.format(execution)) as resp:
                events = await read_events(resp, 1 + n)
            return [e.id or "" for e in events[1:]]

        leaver = asyncio.create_task(watch(3))
        viewers = [asyncio.create_task(watch(20)) for _ in range(30)]
        for _ in range(100):
            if app.state.service.hub.viewer_count == 31:
                break
            await asyncio.sleep(0.05)
        assert app.state.service.hub.viewer_count == 31
        await post_many(c, execution, 10)
        assert await leaver == ["1", "2", "3"]
        await post_many(c, execution, 10, start=10)
        results = await asyncio.gather(*viewers)
        assert all(r == [str(i) for i in range(1, 21)] for r in results)
        page = (await c.get("/v1/messages", params={"task_execution_id": str(execution)})).json()
        assert len(page["items"]) == 20
        for _ in range(100):
            if app.state.service.hub.viewer_count == 0:
                break
            await asyncio.sleep(0.05)
        assert app.state.service.hub.viewer_count == 0


async def test_reconnect_to_another_replica(make_app: MakeApp, store_url: str, tmp_path: object) -> None:
    """Two replicas share the bus and the store; only replica A runs the db-writer."""
    execution = uuid.uuid4()
    async with Bus.from_url("memory://") as bus:
        replica_a = make_app(bus=bus)
        replica_b = make_app(bus=bus, workers=("sse-broadcaster",))
        async with served(replica_a) as url_a, served(replica_b) as url_b, \
                httpx.AsyncClient(timeout=10) as c:
            await post_many_at(c, url_a, execution, 3)
            async with c.stream("GET", url_a + EVENTS.format(execution)) as resp:
                first = await read_events(resp, 3)
            assert first[-1].id == "2"
            async with c.stream("GET", url_b + EVENTS.format(execution), headers={"Last-Event-ID": "2"}) as resp:
                events = await read_events(resp, 2)
                assert [e.id for e in events[1:]] == ["3"]
                # published on the bus and stored by replica A's db-writer: B learns it from its broadcaster
                await bus.send("pm", "dev-1", "via A's db-writer", task_execution_id=execution)
                await c.post(url_a + "/v1/messages", json=message(execution=execution, content="posted to A"))
                live = await read_events(resp, 2)
            assert [e.id for e in live] == ["4", "5"]
            assert {e.data["content"] for e in live} == {"via A's db-writer", "posted to A"}


async def post_many_at(c: httpx.AsyncClient, url: str, execution: uuid.UUID, n: int) -> None:
    bodies = [message(execution=execution, content=f"m{i}") for i in range(n)]
    assert (await c.post(url + "/v1/messages:batch", json={"messages": bodies})).status_code == 200
