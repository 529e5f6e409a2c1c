"""Tracing on a real Redis: the trace context crosses the broker in the envelope headers, between two Buses."""

from __future__ import annotations

import asyncio

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.dispatch import Handler
from tests.core.test_tracing import Traces, attrs, linked, parent_of, span_id, trace_id

pytestmark = pytest.mark.redis


async def test_one_trace_from_sender_through_every_group_and_the_retry(redis_url: str) -> None:
    sender_traces, worker_traces = Traces(), Traces()
    options = ConsumerOptions(max_deliver=3, backoff_base=0.05)
    async with (
        Bus.from_url(redis_url, tracing=True, tracer_provider=sender_traces.provider) as sender,
        Bus.from_url(redis_url, tracing=True, tracer_provider=worker_traces.provider,
                     consumer_options=options) as worker,
    ):
        done: dict[str, asyncio.Event] = {"db-writer": asyncio.Event(), "audit": asyncio.Event()}

        def handler_for(group: str) -> Handler:
            async def handler(delivery: Delivery) -> None:
                if group == "audit" and delivery.attempt == 1:
                    raise RuntimeError("audit log busy")
                done[group].set()
            return handler

        for group in done:
            await worker.subscribe("agent.message.*", handler_for(group), group=group)
        sent = await sender.send("pm", "dev-1", "ship it", "task")
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 20)
        await worker_traces.wait_for(3)
    [send] = sender_traces.spans
    assert send.name == "send agent.message.{recipient_id}" and send.kind == SpanKind.PRODUCER
    assert attrs(send)["messaging.system"] == "redis"
    assert sent.headers["traceparent"].split("-")[2] == f"{span_id(send):016x}"
    processes = worker_traces.named("process agent.message.{recipient_id}")
    assert len(processes) == 3
    for span in processes:
        assert span.kind == SpanKind.CONSUMER
        assert trace_id(span) == trace_id(send)
        assert parent_of(span) == span_id(send)
        assert linked(span) == {span_id(send)}
        assert attrs(span)["messaging.system"] == "redis"
        assert attrs(span)["messaging.message.id"] == str(sent.id)
    by_group = sorted((attrs(s)["messaging.consumer.group.name"], attrs(s)["squadbus.attempt"], s.status.status_code)
                      for s in processes)  # type: ignore[type-var]
    assert by_group == [("audit", 1, StatusCode.ERROR), ("audit", 2, StatusCode.UNSET),
                        ("db-writer", 1, StatusCode.UNSET)]


async def test_request_reply_is_one_trace_across_buses(redis_url: str) -> None:
    asker_traces, responder_traces = Traces(), Traces()
    async with (
        Bus.from_url(redis_url, tracing=True, tracer_provider=asker_traces.provider) as asker,
        Bus.from_url(redis_url, tracing=True, tracer_provider=responder_traces.provider) as responder,
    ):
        async def answer(delivery: Delivery) -> None:
            await responder.reply(delivery.message, "dev-1", "done")

        await responder.subscribe("agent.message.dev-1", answer, group="dev")
        reply = await asker.request("pm", "dev-1", "status?", timeout=10)
        await responder_traces.wait_for(2)
    assert reply.content == "done"
    [request] = asker_traces.spans
    [handled] = responder_traces.named("process agent.message.{recipient_id}")
    [sent_reply] = responder_traces.named("send agent.reply.{inbox}.{request_id}")
    assert request.kind == SpanKind.PRODUCER
    assert trace_id(handled) == trace_id(sent_reply) == trace_id(request)
    assert parent_of(handled) == span_id(request)
    assert parent_of(sent_reply) == span_id(handled)
    assert reply.headers["traceparent"].split("-")[2] == f"{span_id(sent_reply):016x}"
