"""OpenTelemetry spans for a Bus: off by default, on with ``Bus(tracing=True)`` or ``SQUADBUS_TRACING=1``.

Only the OpenTelemetry *API* is used (``pip install 'squadbus[otel]'``); the
SDK, its exporters and the propagators are the application's choice, set up
globally as usual, or a ``tracer_provider`` handed to the Bus. squadbus imports
and runs without OpenTelemetry; tracing turned on without it raises
:class:`~squadbus.core.errors.ConfigError` naming the extra.

The spans follow the OpenTelemetry messaging semantic conventions:

* ``send <template>``, kind PRODUCER, for :meth:`Bus.send`, ``broadcast``,
  ``publish``, ``reply`` and ``request`` (for a request the span lasts until the
  reply arrives or the request times out). Its context is the message's
  *creation context*: injected into the envelope headers by the global
  propagator (W3C ``traceparent`` and ``tracestate`` by default), so it travels
  unchanged on every backend, through every consumer group, retries and dead
  letters. A message that already carries a ``traceparent`` (a custom creation
  context, e.g. re-published) keeps it; the send span links to it.
* ``Bus.publish_many`` of several messages: one ``send <template>`` span of kind
  CLIENT with ``messaging.batch.message_count``, and under it one ``create
  <template>`` PRODUCER span per message, each message's creation context (the
  conventions' batch-publishing shape); the send span links to each.
* ``process <template>``, kind CONSUMER, around each handler call of
  :meth:`Bus.subscribe` (each delivery attempt is its own span, ``squadbus.attempt``
  says which). It is a **child** of the message's creation context and also
  **links** to it: the conventions require the link and allow the parent for a
  single message, and the parent is what makes one trace follow a message and
  everything its handlers send (a reply sent from a handler is a child of that
  process span, so request/reply is one trace). A handler that raises records the
  exception, ``error.type`` and an error status; the retry is another process span
  in the same trace. A message without a creation context starts a new trace.
* ``process <pattern template>``, kind CONSUMER, around each batch of
  :meth:`Bus.subscribe_batch`: a new trace (no parent) with a link to each
  message's creation context and ``messaging.batch.message_count`` (a batch
  cannot have several parents).

``<template>`` is the low-cardinality form of the subject (see
:func:`destination_template`): ``agent.message.{recipient_id}``,
``agent.message.domain.{domain}``, ``agent.message.broadcast``,
``agent.reply.{inbox}.{request_id}``, ``agent.dlq.{group}``; the subject itself is
``messaging.destination.name``, agent ids are ``squadbus.*`` attributes.

Not traced: deliveries a Bus hands to inbox loops (``async for delivery in
inbox``) get no process span, and broadcast copies to inboxes none either; a
:meth:`Bus.reply` made outside any span (an inbox loop) is parented on the
request's creation context instead, so request/reply stays one trace.

Cost when off: the Bus holds ``tracer = None``; each publish checks it once, and
handlers are not wrapped at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from squadbus.core import subjects
from squadbus.core.backend import Delivery
from squadbus.core.dispatch import BatchHandler, Handler
from squadbus.core.envelope import Message
from squadbus.core.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Tracer

INSTALL_HINT = "pip install 'squadbus[otel]'"
TRACEPARENT = "traceparent"
INSTRUMENTATION_NAME = "squadbus"

# Attribute names (OpenTelemetry messaging semantic conventions, plus squadbus.* for our own).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
DESTINATION_TEMPLATE = "messaging.destination.template"
DESTINATION_TEMPORARY = "messaging.destination.temporary"
SUBSCRIPTION = "messaging.destination.subscription.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BATCH_COUNT = "messaging.batch.message_count"
ERROR_TYPE = "error.type"
ATTEMPT = "squadbus.attempt"
SENDER = "squadbus.sender_id"
RECIPIENT = "squadbus.recipient_id"
DOMAIN = "squadbus.domain"
MESSAGE_TYPE = "squadbus.message_type"

Publish = Callable[[Message], Awaitable[None]]
PublishMany = Callable[[Sequence[Message]], Awaitable[None]]


@lru_cache(maxsize=4096)
def destination_template(subject: str) -> str:
    """The low-cardinality form of ``subject`` (or pattern) used in span names.

    Agent ids, request ids and group names become ``{placeholders}``; the squad
    broadcast, patterns and anything outside the scheme are returned as they are.
    """
    tokens = subject.split(".")
    if any(t in ("*", ">") for t in tokens) or len(tokens) < 3 or tokens[0] != subjects.ROOT:
        return subject
    kind = tokens[1]
    if kind == "message":
        if subject == subjects.BROADCAST:
            return subject
        if tokens[2] == "domain" and len(tokens) == 4:
            return f"{subjects.DOMAIN_PREFIX}.{{domain}}"
        if len(tokens) == 3:
            return f"{subjects.MESSAGE_PREFIX}.{{recipient_id}}"
    elif kind == "reply" and len(tokens) == 4:
        return f"{subjects.REPLY_PREFIX}.{{inbox}}.{{request_id}}"
    elif kind == "dlq" and len(tokens) == 3:
        return f"{subjects.DLQ_PREFIX}.{{group}}"
    return subject


def _message_attributes(message: Message, system: str, operation: str) -> dict[str, Any]:
    subject = message.subject
    attrs: dict[str, Any] = {
        SYSTEM: system,
        OPERATION_TYPE: operation,
        OPERATION_NAME: operation,
        DESTINATION: subject,
        DESTINATION_TEMPLATE: destination_template(subject),
        MESSAGE_ID: str(message.id),
        SENDER: message.sender_id,
        MESSAGE_TYPE: message.message_type,
    }
    if subject.startswith(subjects.REPLY_PREFIX):
        attrs[DESTINATION_TEMPORARY] = True
    if message.recipient_id is not None:
        attrs[RECIPIENT] = message.recipient_id
    if message.domain is not None:
        attrs[DOMAIN] = message.domain
    if message.task_execution_id is not None:
        attrs[CONVERSATION_ID] = str(message.task_execution_id)
    return attrs


class BusTracer:
    """The spans of one Bus over the backend ``system`` (``memory``, ``redis``, …); see the module docstring.

    Built by the Bus when ``tracing=True``; raises ConfigError when OpenTelemetry is not installed.
    ``tracer_provider`` None means OpenTelemetry's global provider.
    """

    def __init__(self, system: str, tracer_provider: Any = None) -> None:
        try:
            from opentelemetry import propagate, trace
            from opentelemetry.context import Context
        except ImportError as exc:
            raise ConfigError(f"tracing is on but OpenTelemetry is not installed: {INSTALL_HINT}") from exc
        self.system = system
        self._trace = trace
        self._propagate = propagate
        self._empty_context = Context
        self._tracer: Tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)

    # ---- producing ----------------------------------------------------------------------------

    def _creation_link(self, headers: Mapping[str, str]) -> list[Link]:
        """A link to the creation context carried in ``headers``, if any."""
        span_context = self._trace.get_current_span(self._propagate.extract(headers)).get_span_context()
        return [self._trace.Link(span_context)] if span_context.is_valid else []

    def _inject(self, message: Message) -> Message:
        carrier: dict[str, str] = {}
        self._propagate.inject(carrier)
        return message.with_headers(**carrier) if carrier else message

    @contextlib.contextmanager
    def sending(self, message: Message, *, parent_headers: Mapping[str, str] | None = None) -> Iterator[Message]:
        """A ``send`` PRODUCER span as the current span; yields ``message`` with its creation context injected.

        ``parent_headers`` (a request's, for a reply): the span's parent when no span is current.
        """
        trace = self._trace
        context: Context | None = None
        if parent_headers is not None and not trace.get_current_span().get_span_context().is_valid:
            context = self._propagate.extract(parent_headers)
        custom = TRACEPARENT in message.headers
        links = self._creation_link(message.headers) if custom else None
        with self._tracer.start_as_current_span(
            f"send {destination_template(message.subject)}", context=context, kind=trace.SpanKind.PRODUCER,
            attributes=_message_attributes(message, self.system, "send"), links=links,
        ) as span:
            try:
                yield message if custom else self._inject(message)
            except BaseException as exc:
                span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                raise

    async def publish(self, publish: Publish, message: Message) -> Message:
        """Publish ``message`` with ``publish`` inside a send span; returns the message as published."""
        with self.sending(message) as sent:
            await publish(sent)
        return sent

    async def publish_many(self, publish_many: PublishMany, messages: Sequence[Message]) -> Sequence[Message]:
        """Publish ``messages`` with ``publish_many`` inside one send span, each with a create span (see above)."""
        if len(messages) == 1:
            return [await self.publish(lambda m: publish_many([m]), messages[0])]
        trace = self._trace
        first = messages[0]
        template = destination_template(first.subject)
        if any(destination_template(m.subject) != template for m in messages):
            template = subjects.MESSAGE_PREFIX
        attrs: dict[str, Any] = {
            SYSTEM: self.system, OPERATION_TYPE: "send", OPERATION_NAME: "send", BATCH_COUNT: len(messages),
        }
        with self._tracer.start_as_current_span(f"send {template}", kind=trace.SpanKind.CLIENT,
                                                attributes=attrs) as span:
            sent: list[Message] = []
            for message in messages:
                if TRACEPARENT in message.headers:
                    sent.append(message)
                    for link in self._creation_link(message.headers):
                        span.add_link(link.context)
                    continue
                with self._tracer.start_as_current_span(
                    f"create {destination_template(message.subject)}", kind=trace.SpanKind.PRODUCER,
                    attributes=_message_attributes(message, self.system, "create"),
                ) as created:
                    sent.append(self._inject(message))
                span.add_link(created.get_span_context())
            try:
                await publish_many(sent)
            except BaseException as exc:
                span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                raise
        return sent

    # ---- consuming ----------------------------------------------------------------------------

    def handler(self, handler: Handler, pattern: str) -> Handler:
        """``handler`` run inside a ``process`` CONSUMER span per delivery (see the module docstring)."""
        tracer, trace, extract, system = self._tracer, self._trace, self._propagate.extract, self.system
        consumer = trace.SpanKind.CONSUMER

        async def traced(delivery: Delivery) -> None:
            message = delivery.message
            parent = extract(message.headers)
            span_context = trace.get_current_span(parent).get_span_context()
            attrs = _message_attributes(message, system, "process")
            attrs[SUBSCRIPTION] = pattern
            attrs[ATTEMPT] = delivery.attempt
            if delivery.group is not None:
                attrs[CONSUMER_GROUP] = delivery.group
            with tracer.start_as_current_span(
                f"process {attrs[DESTINATION_TEMPLATE]}", context=parent, kind=consumer, attributes=attrs,
                links=[trace.Link(span_context)] if span_context.is_valid else None,
            ) as span:
                try:
                    await handler(delivery)
                except Exception as exc:
                    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                    raise

        return traced

    def batch_handler(self, handler: BatchHandler, pattern: str) -> BatchHandler:
        """``handler`` run inside one ``process`` CONSUMER span per batch, linked to each message's context."""
        tracer, trace, system = self._tracer, self._trace, self.system
        consumer = trace.SpanKind.CONSUMER
        name = f"process {destination_template(pattern)}"

        async def traced(deliveries: Sequence[Delivery]) -> Mapping[Delivery, BaseException] | None:
            links = [link for d in deliveries for link in self._creation_link(d.message.headers)]
            attrs: dict[str, Any] = {
                SYSTEM: system, OPERATION_TYPE: "process", OPERATION_NAME: "process",
                SUBSCRIPTION: pattern, BATCH_COUNT: len(deliveries),
            }
            if deliveries and deliveries[0].group is not None:
                attrs[CONSUMER_GROUP] = deliveries[0].group
            with tracer.start_as_current_span(name, context=self._empty_context(), kind=consumer,
                                              attributes=attrs, links=links) as span:
                try:
                    failures = await handler(deliveries)
                except Exception as exc:
                    span.set_attribute(ERROR_TYPE, type(exc).__qualname__)
                    raise
                if failures:
                    span.set_attribute(ERROR_TYPE, type(next(iter(failures.values()))).__qualname__)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"{len(failures)} of the batch failed"))
                return failures

        return traced

    # ---- incoming requests --------------------------------------------------------------------

    @contextlib.contextmanager
    def continued(self, headers: Mapping[str, str]) -> Iterator[None]:
        """Make the trace context of incoming (HTTP) ``headers`` current, unless a span already is.

        With an HTTP server instrumentation installed its server span is current and is kept.
        """
        if self._trace.get_current_span().get_span_context().is_valid:
            yield
            return
        from opentelemetry import context as otel_context

        token = otel_context.attach(self._propagate.extract(headers))
        try:
            yield
        finally:
            otel_context.detach(token)


def continue_trace(tracer: BusTracer | None, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """:meth:`BusTracer.continued`, or nothing when tracing is off (``tracer`` None)."""
    return contextlib.nullcontext() if tracer is None else tracer.continued(headers)
