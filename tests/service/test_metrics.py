"""/metrics: Prometheus text with the service, bus, SSE and worker figures; one registry per app."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

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


async def test_message_type_labels_are_bounded(make_app: MakeApp) -> None:
    # an agent inventing a type per message must not grow /metrics without end (issue 16 item 3)
    distinct, budget = 1200, 20
    async with asgi(make_app(metrics_message_types=budget, workers=("analytics",))) as api:
        for start in range(0, distinct, 400):
            bodies = [message(message_type=f"type-{i}") for i in range(start, start + 400)]
            r = await api.client.post("/v1/messages:batch", json={"messages": bodies})
            assert r.status_code == 200
        for _ in range(100):
            got = samples((await api.client.get("/metrics")).text)
            consumed = {k: v for k, v in got.items() if k[0] == "squadbus_messages_consumed_total"}
            if sum(consumed.values()) == distinct:
                break
            await asyncio.sleep(0.05)
    for family in ("squadbus_messages_published_total", "squadbus_messages_stored_total",
                   "squadbus_messages_consumed_total"):
        values = {dict(labels)["message_type"]: v for (name, labels), v in got.items() if name == family}
        assert len(values) == budget + 1, family
        assert values["other"] == distinct - budget, family
        assert sum(values.values()) == distinct, family


async def test_label_values_carry_no_raw_control_characters(api: Api) -> None:
    kind = "evil\r\n# TYPE fake counter\x00\u2028end"
    assert (await api.client.post("/v1/messages", json=message(message_type=kind))).status_code == 201
    raw = (await api.client.get("/metrics")).content
    assert b"\r" not in raw and b"\x00" not in raw and "\u2028".encode() not in raw
    assert not any(line.startswith(b"# TYPE fake") for line in raw.split(b"\n"))
    published = {dict(labels)["message_type"] for (name, labels), _ in samples(raw.decode()).items()
                 if name == "squadbus_messages_published_total"}
    assert len(published) == 1


async def test_metrics_show_the_dual_write_spool(make_app: MakeApp, tmp_path: Path) -> None:
    url = f"dual://memory://|memory://|secondary=spool&spool={tmp_path / 'spool.db'}"
    async with asgi(make_app(url=url)) as api:
        got = samples((await api.client.get("/metrics")).text)
    assert got[("squadbus_backend_dual_spool_depth", ())] == 0
    assert got[("squadbus_backend_dual_spool_refused", ())] == 0
    assert got[("squadbus_backend_dual_secondary_failures", ())] == 0
    assert got[("squadbus_backend_dual_spooling", ())] == 0
