"""/metrics: Prometheus text with the service, bus, SSE and worker figures; one registry per app."""

from __future__ import annotations

import asyncio
import uuid

from prometheus_client.parser import text_string_to_metric_families

from squadbus.core.bus import Bus
from tests.service.conftest import Api, MakeApp, asgi, message


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_content(api: Api) -> None:
    execution = uuid.uuid4()
    for kind in ("task", "task", "note"):
        assert (await api.client.post("/v1/messages", json=message(execution=execution,
                                                                   message_type=kind))).status_code == 201
    bus: Bus = api.service.bus
    await bus.send("pm", "dev-1", "ready?", "question", task_execution_id=execution)
    await bus.send("dev-1", "pm", "yes", "answer", task_execution_id=execution)
    for _ in range(100):
        text = (await api.client.get("/metrics")).text
        got = samples(text)
        if got.get(("squadbus_response_time_seconds_count", ())) == 1 and \
                got.get(("squadbus_messages_stored_total", (("message_type", "answer"), ("worker", "db-writer")))):
            break
        await asyncio.sleep(0.05)
    r = await api.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)
    assert got[("squadbus_messages_published_total", (("backend", "memory"), ("message_type", "task")))] == 2
    assert got[("squadbus_messages_published_total", (("backend", "memory"), ("message_type", "note")))] == 1
    assert got[("squadbus_messages_consumed_total", (("backend", "memory"), ("message_type", "task")))] == 2
    assert got[("squadbus_messages_consumed_total", (("backend", "memory"), ("message_type", "question")))] == 1
    assert got[("squadbus_response_time_seconds_count", ())] == 1
    assert got[("squadbus_consumer_lag_seconds_count", (("worker", "db-writer"),))] >= 5
    assert got[("squadbus_handler_latency_seconds_count", (("worker", "analytics"),))] >= 5
    assert ("squadbus_handler_latency_seconds_count", (("worker", "audit-logger"),)) in got
    assert ("squadbus_handler_latency_seconds_count", (("worker", "sse-broadcaster"),)) in got
    for name in ("squadbus_bus_redeliveries_total", "squadbus_bus_dead_letters_total", "squadbus_sse_viewers",
                 "squadbus_agents_tracked", "squadbus_bus_deliveries_total"):
        assert (name, ()) in got, name
    assert got[("squadbus_agents_tracked", ())] == 2


async def test_each_app_has_its_own_registry(make_app: MakeApp) -> None:
    async with asgi(make_app(workers=())) as one, asgi(make_app(workers=())) as two:
        await one.client.post("/v1/messages", json=message())
        a = samples((await one.client.get("/metrics")).text)
        b = samples((await two.client.get("/metrics")).text)
    key = ("squadbus_messages_published_total", (("backend", "memory"), ("message_type", "message")))
    assert a[key] == 1
    assert key not in b
