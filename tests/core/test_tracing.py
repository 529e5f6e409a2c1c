"""OpenTelemetry tracing on the memory backend: span names, kinds, parents, links, attributes; off adds nothing."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from squadbus.core import envelope
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings
from squadbus.core.tracing import destination_template


class Traces:
    """An SDK tracer provider whose finished spans are kept in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[ReadableSpan]:
        """The finished spans once there are at least ``count`` of them."""
        async with asyncio.timeout(timeout):
            while len(self.spans) < count:
                await asyncio.sleep(0.01)
        return self.spans

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
def traces() -> Traces:
    return Traces()


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def attrs(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


async def collect(bus: Bus, pattern: str, count: int, *, group: str | None = None,
                  check: Callable[[Delivery], None] | None = None) -> tuple[list[Delivery], asyncio.Event]:
    seen: list[Delivery] = []
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        if check is not None:
            check(delivery)
        seen.append(delivery)
        if len(seen) >= count:
            done.set()

    await bus.subscribe(pattern, handler, group=group)
    return seen, done


def test_destination_templates_hide_ids() -> None:
    assert destination_template("agent.message.dev-1") == "agent.message.{recipient_id}"
    assert destination_template("agent.message.domain.dev") == "agent.message.domain.{domain}"
    assert destination_template("agent.message.broadcast") == "agent.message.broadcast"
    assert destination_template("agent.reply.ab12.x") == "agent.reply.{inbox}.{request_id}"
    assert destination_template("agent.dlq.db-writer") == "agent.dlq.{group}"
    assert destination_template("agent.message.*") == "agent.message.*"


async def test_send_gives_one_trace_through_every_consumer_group(traces: Traces) -> None:
    execution = uuid.uuid4()
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider) as bus:
        _, writer_done = await collect(bus, "agent.message.*", 1, group="db-writer")
        _, audit_done = await collect(bus, "agent.>", 1, group="audit")
        sent = await bus.send("pm", "dev-1", "build the login page", "task", task_execution_id=execution)
        await asyncio.wait_for(asyncio.gather(writer_done.wait(), audit_done.wait()), 5)
        spans = await traces.wait_for(3)
    assert "traceparent" in sent.headers
    [send] = traces.named("send agent.message.{recipient_id}")
    consumers = traces.named("process agent.message.{recipient_id}")
    assert len(spans) == 3 and len(consumers) == 2
    assert send.kind == SpanKind.PRODUCER
    assert send.parent is None
    assert sent.headers["traceparent"].split("-")[2] == f"{span_id(send):016x}"
    assert attrs(send)["messaging.system"] == "memory"
    assert attrs(send)["messaging.operation.type"] == "send"
    assert attrs(send)["messaging.destination.name"] == "agent.message.dev-1"
    assert attrs(send)["messaging.message.id"] == str(sent.id)
    assert attrs(send)["messaging.message.conversation_id"] == str(execution)
    assert attrs(send)["squadbus.sender_id"] == "pm"
    assert attrs(send)["squadbus.recipient_id"] == "dev-1"
    for span in consumers:
        assert span.kind == SpanKind.CONSUMER
        assert trace_id(span) == trace_id(send)
        assert parent_of(span) == span_id(send)  # child of the creation context ...
        assert linked(span) == {span_id(send)}  # ... and linked to it, as the conventions ask
        assert attrs(span)["messaging.operation.type"] == "process"
        assert attrs(span)["messaging.message.id"] == str(sent.id)
        assert attrs(span)["squadbus.attempt"] == 1
        assert span.status.status_code == StatusCode.UNSET
    assert {attrs(s)["messaging.consumer.group.name"] for s in consumers} == {"db-writer", "audit"}
    assert {attrs(s)["messaging.destination.subscription.name"] for s in consumers} == {"agent.message.*", "agent.>"}


async def test_request_reply_is_one_trace_both_ways(traces: Traces) -> None:
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider) as bus:

        async def responder(delivery: Delivery) -> None:
            await bus.reply(delivery.message, "dev-1", f"done: {delivery.message.content}")

        await bus.subscribe("agent.message.dev-1", responder, group="dev")
        answer = await bus.request("pm", "dev-1", "status?", timeout=5)
        assert answer.content == "done: status?"
        spans = await traces.wait_for(4)
    [request] = traces.named("send agent.message.{recipient_id}")
    [handled] = traces.named("process agent.message.{recipient_id}")
    [reply] = traces.named("send agent.reply.{inbox}.{request_id}")
    [got] = traces.named("process agent.reply.{inbox}.{request_id}")
    assert len(spans) == 4
    assert len({trace_id(s) for s in spans}) == 1
    assert request.kind == SpanKind.PRODUCER and reply.kind == SpanKind.PRODUCER
    assert parent_of(handled) == span_id(request)
    assert parent_of(reply) == span_id(handled)  # sent from inside the handler's span
    assert parent_of(got) == span_id(reply)
    assert attrs(reply)["messaging.destination.temporary"] is True
    # the request's send span lasts until the reply is in
    assert request.end_time is not None and got.start_time is not None and request.end_time >= got.start_time


async def test_reply_outside_any_span_continues_the_request(traces: Traces) -> None:
    """An inbox loop runs in the agent's own task: its reply is parented on the request."""
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider) as bus:
        async with bus.inbox("dev-1", broadcasts=False) as inbox:

            async def agent() -> None:
                async for delivery in inbox:
                    async with delivery:
                        await bus.reply(delivery.message, "dev-1", "ok")
                    return

            task = asyncio.create_task(agent())
            await bus.request("pm", "dev-1", "ping", timeout=5)
            await task
        await traces.wait_for(4)
    [request] = traces.named("send agent.message.{recipient_id}")
    [reply] = traces.named("send agent.reply.{inbox}.{request_id}")
    assert trace_id(reply) == trace_id(request)
    assert parent_of(reply) == span_id(request)


async def test_failing_handler_records_the_error_and_the_retry_is_in_the_same_trace(traces: Traces) -> None:
    options = ConsumerOptions(max_deliver=3, backoff_base=0.01)
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider,
                            consumer_options=options) as bus:
        attempts: list[int] = []
        done = asyncio.Event()

        async def flaky(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if delivery.attempt == 1:
                raise RuntimeError("model overloaded")
            done.set()

        await bus.subscribe("agent.message.dev-1", flaky, group="dev")
        await bus.send("pm", "dev-1", "try me")
        await asyncio.wait_for(done.wait(), 5)
        await traces.wait_for(3)
    [send] = traces.named("send agent.message.{recipient_id}")
    first, second = sorted(traces.named("process agent.message.{recipient_id}"),
                           key=lambda s: attrs(s)["squadbus.attempt"])  # type: ignore[arg-type,return-value]
    assert attempts == [1, 2]
    assert trace_id(first) == trace_id(second) == trace_id(send)
    assert parent_of(first) == parent_of(second) == span_id(send)
    assert first.status.status_code == StatusCode.ERROR
    assert attrs(first)["error.type"] == "RuntimeError"
    assert [e.name for e in first.events] == ["exception"]
    assert attrs(second)["squadbus.attempt"] == 2
    assert second.status.status_code == StatusCode.UNSET


async def test_batches_link_to_every_message(traces: Traces) -> None:
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider) as bus:
        got: list[Delivery] = []
        done = asyncio.Event()

        async def batch(deliveries: Sequence[Delivery]) -> None:
            got.extend(deliveries)
            if len(got) >= 3:
                done.set()

        await bus.subscribe_batch("agent.message.>", batch, group="db-writer", max_batch=10, max_wait=0.2)
        messages = [envelope.build(subject="agent.message.dev-1", sender_id="pm", recipient_id="dev-1",
                                   content=f"m{i}") for i in range(3)]
        sent = await bus.publish_many(messages)
        await asyncio.wait_for(done.wait(), 5)
        await traces.wait_for(5)
    [send] = traces.named("send agent.message.{recipient_id}")
    creates = traces.named("create agent.message.{recipient_id}")
    processes = traces.named("process agent.message.>")
    assert send.kind == SpanKind.CLIENT and attrs(send)["messaging.batch.message_count"] == 3
    assert len(creates) == 3 and all(c.kind == SpanKind.PRODUCER and parent_of(c) == span_id(send) for c in creates)
    assert linked(send) == {span_id(c) for c in creates}
    assert [m.headers["traceparent"].split("-")[2] for m in sent] == [f"{span_id(c):016x}" for c in creates]
    assert sum(attrs(p)["messaging.batch.message_count"] for p in processes) == 3  # type: ignore[misc]
    for process in processes:
        assert process.kind == SpanKind.CONSUMER and process.parent is None
        assert linked(process) <= {span_id(c) for c in creates}
    assert set().union(*(linked(p) for p in processes)) == {span_id(c) for c in creates}


async def test_a_custom_creation_context_is_kept_and_linked(traces: Traces) -> None:
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with Bus.from_url("memory://", tracing=True, tracer_provider=traces.provider) as bus:
        sent = await bus.send("pm", "dev-1", "forwarded", headers={"traceparent": theirs})
        await traces.wait_for(1)
    [send] = traces.spans
    assert sent.headers["traceparent"] == theirs
    assert linked(send) == {0xB7AD6B7169203331}


async def test_tracing_off_adds_no_header_and_no_span(traces: Traces) -> None:
    async with Bus.from_url("memory://") as bus:
        assert bus.tracer is None
        seen, done = await collect(bus, "agent.message.*", 1)
        sent = await bus.send("pm", "dev-1", "quiet")
        await asyncio.wait_for(done.wait(), 5)
    assert sent.headers == {}
    assert seen[0].message.headers == {}
    assert traces.spans == []


def test_tracing_without_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import opentelemetry -> ImportError
    with pytest.raises(ConfigError, match=r"squadbus\[otel\]"):
        Bus.from_url("memory://", tracing=True)
    Bus.from_url("memory://")  # off: no import at all


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("1", True), ("on", True), ("TRUE", True),
                                                  ("0", False), ("off", False), ("", False)])
def test_the_setting(value: str | None, expected: bool) -> None:
    env = {} if value is None else {"SQUADBUS_TRACING": value}
    settings = Settings.from_env({**env, "SQUADBUS_DATA_DIR": "/nonexistent"})
    assert settings.tracing is expected
    assert (Bus.from_settings(settings).tracer is not None) is expected


def test_a_bad_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="SQUADBUS_TRACING"):
        Settings.from_env({"SQUADBUS_TRACING": "maybe", "SQUADBUS_DATA_DIR": "/nonexistent"})
