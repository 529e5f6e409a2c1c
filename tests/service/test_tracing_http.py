"""POST /v1/messages continues an incoming W3C trace: the publish span is a child of the caller's span."""

from __future__ import annotations

import asyncio

from squadbus.core.backend import Delivery
from squadbus.core.bus import Bus
from tests.core.test_tracing import Traces, parent_of, span_id, trace_id
from tests.service.conftest import MakeApp, asgi, message

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{CALLER_SPAN}-01"


async def test_post_continues_the_callers_trace_to_every_consumer(make_app: MakeApp) -> None:
    traces = Traces()
    bus = Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider)
    async with bus, asgi(make_app(bus=bus)) as api:
        got = asyncio.Event()

        async def agent(delivery: Delivery) -> None:
            got.set()

        await bus.subscribe("agent.message.dev-1", agent, group="dev")
        r = await api.client.post("/v1/messages", json=message(), headers={"traceparent": TRACEPARENT})
        assert r.status_code == 201, r.text
        await asyncio.wait_for(got.wait(), 5)
        await traces.wait_for(2)
        body = r.json()
    [send] = traces.named("send agent.message.{recipient_id}")
    assert f"{trace_id(send):032x}" == TRACE
    assert parent_of(send) == int(CALLER_SPAN, 16)
    assert body["headers"]["traceparent"].split("-")[1:3] == [TRACE, f"{span_id(send):016x}"]
    [handled] = [s for s in traces.named("process agent.message.{recipient_id}")
                 if (s.attributes or {}).get("messaging.consumer.group.name") == "dev"]
    assert parent_of(handled) == span_id(send) and f"{trace_id(handled):032x}" == TRACE


async def test_batch_continues_the_trace_and_no_header_starts_a_new_one(make_app: MakeApp) -> None:
    traces = Traces()
    bus = Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider)
    async with bus, asgi(make_app(bus=bus)) as api:
        r = await api.client.post("/v1/messages:batch", json={"messages": [message(), message(content="2")]},
                                  headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200, r.text
        plain = await api.client.post("/v1/messages", json=message(content="untraced caller"))
        assert plain.status_code == 201, plain.text
    batch = [s for s in traces.spans if s.name == "send agent.message.{recipient_id}"
             and (s.attributes or {}).get("messaging.batch.message_count") == 2]
    [batch_send] = batch
    assert parent_of(batch_send) == int(CALLER_SPAN, 16)
    creates = traces.named("create agent.message.{recipient_id}")
    assert len(creates) == 2 and all(f"{trace_id(c):032x}" == TRACE for c in creates)
    [single] = [s for s in traces.named("send agent.message.{recipient_id}") if s is not batch_send
                and (s.attributes or {}).get("messaging.batch.message_count") is None]
    assert single.parent is None and f"{trace_id(single):032x}" != TRACE
