"""The Bus: what agent code talks to, the same on every backend.

>>> async with Bus.from_url("memory://") as bus:
...     await bus.send("pm", "dev-1", "Please build the login page", "task")

The Bus builds and validates envelopes, routes them to subjects, wraps
handlers so every delivery is acked, retried or dead-lettered, and provides
inboxes and request/reply on top of any :class:`~squadbus.core.backend.Backend`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

from squadbus.core import envelope, subjects
from squadbus.core.backend import (
    Backend,
    BatchSubscriber,
    ConsumerOptions,
    Delivery,
    QueuedPublish,
    Replayable,
    Requester,
    StartFrom,
    Subscription,
    publish_all,
)
from squadbus.core.batching import gather_batches
from squadbus.core.broadcasts import HOST_GROUP_PREFIX, BroadcastHub
from squadbus.core.dispatch import BatchHandler, DispatchStats, Handler, wrap, wrap_batch
from squadbus.core.envelope import DEFAULT_MAX_CONTENT_BYTES, Message
from squadbus.core.errors import Closed, ConfigError, InvalidSubject, RequestTimeout
from squadbus.core.inbox import Inbox, InboxHandler
from squadbus.core.placement import InboxPlacement, PlacesInboxes
from squadbus.core.registry import open_backend
from squadbus.core.settings import Settings
from squadbus.core.tracing import BusTracer

logger = logging.getLogger("squadbus.bus")

REPLY_TO = "reply_to"
CORRELATION_ID = "correlation_id"
DEADLINE = "deadline"


class Bus:
    """Send, broadcast, subscribe, request and replay over one backend.

    Use as an async context manager, or call :meth:`start` and :meth:`close`.
    ``close()`` closes every inbox the Bus made (their unsettled deliveries
    are nacked), stops every subscription (each finishes the handler in
    progress) and then closes the backend if the Bus owns it. Each of those
    steps gets ``close_timeout`` seconds; what is still running then is
    cancelled (a cancelled handler's delivery is nacked) and logged, so closing
    always ends. Leaving ``async with`` on an error never hides that error:
    a failure to close is then logged, and the original error propagates.

    ``tracing=True`` emits OpenTelemetry spans and carries the trace context in
    the message headers (see :mod:`squadbus.core.tracing`; needs
    ``squadbus[otel]``), with ``tracer_provider`` or OpenTelemetry's global one.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES,
        consumer_options: ConsumerOptions | None = None,
        owns_backend: bool = True,
        close_timeout: float = 10.0,
        host_id: str | None = None,
        tracing: bool = False,
        tracer_provider: Any = None,
    ) -> None:
        if close_timeout <= 0:
            raise ConfigError("close_timeout must be positive")
        if host_id is not None:
            try:
                subjects.validate_token(host_id, what="host_id")
            except InvalidSubject as exc:
                raise ConfigError(str(exc)) from None
        self.host_id = host_id
        self.backend = backend
        self.tracer: BusTracer | None = BusTracer(backend.name, tracer_provider) if tracing else None
        """The Bus's spans when tracing is on, else None."""
        self.close_timeout = close_timeout
        self.max_content_bytes = max_content_bytes
        self.consumer_options = consumer_options or ConsumerOptions()
        self.stats = DispatchStats()
        self._owns_backend = owns_backend
        self._subscriptions: list[Subscription] = []
        # Weak: an inbox never opened costs nothing; an open one is held by its subscriptions.
        self._inboxes: weakref.WeakSet[Inbox] = weakref.WeakSet()
        self._started = False
        self._closed = False
        self._reply_token = secrets.token_hex(8)
        self._reply_sub: Subscription | None = None
        self._reply_lock = asyncio.Lock()
        self._pending_replies: dict[str, asyncio.Future[Message]] = {}
        self._broadcast_hub: BroadcastHub | None = None
        self._enqueue = backend.enqueue if isinstance(backend, QueuedPublish) else None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> Bus:
        """A Bus over the backend named by ``url`` (not yet started)."""
        return cls(open_backend(url), **kwargs)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Bus:
        """A Bus built from a :class:`Settings` object (see ``Settings.from_env``)."""
        kwargs.setdefault("host_id", settings.host_id)
        kwargs.setdefault("tracing", settings.tracing)
        return cls(open_backend(settings.url), max_content_bytes=settings.max_content_bytes, **kwargs)

    async def start(self) -> Bus:
        """Connect the backend (idempotent)."""
        if self._closed:
            raise Closed("bus is closed")
        if not self._started:
            if self._owns_backend:
                await self.backend.connect()
            self._started = True
        return self

    async def close(self) -> None:
        """Close inboxes and subscriptions, fail pending requests, close the backend. Idempotent.

        Every step runs even if an earlier one failed; the first failure is raised at the end.
        """
        if self._closed:
            return
        self._closed = True
        errors = await self._finish("inbox", [inbox.close() for inbox in list(self._inboxes) if inbox.is_open])
        if self._broadcast_hub is not None:
            errors += await self._finish("broadcast subscription", [self._broadcast_hub.close()])
        subs, self._subscriptions = self._subscriptions, []
        errors += await self._finish("subscription", [sub.close() for sub in reversed(subs)])
        for fut in self._pending_replies.values():
            if not fut.done():
                fut.set_exception(Closed("bus closed while waiting for a reply"))
        self._pending_replies.clear()
        if self._owns_backend and self._started:
            errors += await self._finish("backend", [self.backend.close()])
        for extra in errors[1:]:
            logger.error("closing the bus also failed with: %s", extra, exc_info=extra)
        if errors:
            raise errors[0]

    async def _finish(self, what: str, closing: Sequence[Awaitable[None]]) -> list[Exception]:
        """Run ``closing`` concurrently for up to ``close_timeout`` seconds, then cancel the rest.

        Returns the errors they raised, for the caller to raise.
        """
        if not closing:
            return []
        tasks = [asyncio.ensure_future(step) for step in closing]
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.close_timeout)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        if pending:
            logger.error(
                "%d of %d %s closes did not finish within close_timeout=%ss; cancelled them "
                "(their unsettled deliveries are nacked)", len(pending), len(tasks), what, self.close_timeout,
            )
            for task in pending:
                task.cancel()
            # A close that ignores cancellation must not hang us either.
            await asyncio.wait(pending, timeout=self.close_timeout)
        errors: list[Exception] = []
        for task in done:
            if task.cancelled():
                continue
            error = task.exception()
            if isinstance(error, Exception):
                errors.append(error)
            elif error is not None:
                raise error
        return errors

    async def __aenter__(self) -> Bus:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.close()
            return
        try:
            await self.close()
        except Exception:
            logger.exception("closing the bus failed while leaving on %s; raising that instead", type(exc).__name__)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("bus is closed")
        if not self._started:
            raise Closed("bus is not started: use 'async with' or await bus.start()")

    # ---- publishing -------------------------------------------------------------------------

    async def publish(self, message: Message) -> Message:
        """Publish a ready-made message on its own subject (under ``agent.``); returns it once stored."""
        self._check_open()
        envelope.validate(message, max_content_bytes=self.max_content_bytes)
        subjects.validate_scheme(message.subject)
        if self.tracer is not None:
            return await self.tracer.publish(self.backend.publish, message)
        if self._enqueue is not None:
            await self._enqueue(message)
        else:
            await self.backend.publish(message)
        return message

    async def publish_many(self, messages: Sequence[Message]) -> Sequence[Message]:
        """Publish ready-made messages in few round trips; returns them once all are stored.

        Every message is validated before any is sent (one bad message: nothing
        is published). Order is kept per ``task_execution_id``. On a
        :class:`~squadbus.core.errors.BackendError` some may have been stored:
        publishing the same list again is safe (ids dedupe). Build messages with
        :func:`squadbus.core.envelope.build`.
        """
        self._check_open()
        limit = self.max_content_bytes
        for message in messages:
            envelope.validate(message, max_content_bytes=limit)
            subjects.validate_scheme(message.subject)
        if messages:
            if self.tracer is not None:
                return await self.tracer.publish_many(lambda batch: publish_all(self.backend, batch), messages)
            await publish_all(self.backend, messages)
        return messages

    async def send(
        self,
        sender_id: object,
        recipient_id: object | None,
        content: str,
        message_type: str = "message",
        *,
        task_execution_id: UUID | str | None = None,
        metadata: dict[str, Any] | None = None,
        id: UUID | str | None = None,
        domain: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """Send a direct message; ``recipient_id=None`` broadcasts to the whole squad."""
        self._check_open()
        if recipient_id is None:
            subject = subjects.BROADCAST if domain is None else subjects.domain(domain)
        else:
            subject = subjects.direct(str(recipient_id))
        message = envelope.build(
            subject=subject,
            sender_id=sender_id,
            recipient_id=recipient_id,
            content=content,
            message_type=message_type,
            domain=domain,
            task_execution_id=task_execution_id,
            metadata=metadata,
            headers=headers,
            id=id,
            max_content_bytes=self.max_content_bytes,
        )
        if self.tracer is not None:
            return await self.tracer.publish(self.backend.publish, message)
        if self._enqueue is not None:
            await self._enqueue(message)
        else:
            await self.backend.publish(message)
        return message

    async def broadcast(
        self,
        sender_id: object,
        content: str,
        message_type: str = "broadcast",
        *,
        domain: str | None = None,
        task_execution_id: UUID | str | None = None,
        metadata: dict[str, Any] | None = None,
        id: UUID | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Message:
        """Broadcast to every agent of ``domain``, or to the whole squad when None."""
        return await self.send(
            sender_id, None, content, message_type,
            domain=domain, task_execution_id=task_execution_id, metadata=metadata, id=id, headers=headers,
        )

    async def send_message(
        self,
        sender_id: object,
        recipient_id: object | None,
        content: str,
        message_type: str,
        metadata: dict[str, Any] | None = None,
        task_execution_id: UUID | str | None = None,
        db: object | None = None,
    ) -> Message:
        """The guide's ``MessageBus.send_message``, unchanged for agent code written against it.

        ``db`` is accepted and ignored: history is written by the db-writer
        consumer group, idempotently, not inside the send path.
        """
        return await self.send(
            sender_id, recipient_id, content, message_type,
            metadata=metadata, task_execution_id=task_execution_id,
        )

    # ---- consuming --------------------------------------------------------------------------

    async def subscribe(
        self,
        pattern: str,
        handler: Handler,
        *,
        group: str | None = None,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """Run ``handler`` for every message matching ``pattern``.

        ``group=None``: this subscription alone sees every new message (fan-out).
        With a group name, subscriptions of the same group and pattern share
        the work and each group gets every message. The handler returning
        acks; raising nacks (retried with backoff, dead-lettered after
        ``max_deliver``); see :mod:`squadbus.core.dispatch`.
        """
        self._check_open()
        subjects.validate_pattern(pattern)
        if group is not None:
            subjects.validate_token(group, what="group")
        opts = options or self.consumer_options
        if self.tracer is not None:
            handler = self.tracer.handler(handler, pattern)
        raw = wrap(handler, opts, self.backend.publish, self.stats)
        sub = await self.backend.subscribe(pattern, raw, group=group, options=opts)
        self._subscriptions.append(sub)
        return sub

    async def subscribe_batch(
        self,
        pattern: str,
        handler: BatchHandler,
        *,
        group: str | None = None,
        max_batch: int = 500,
        max_wait: float = 0.05,
        pipeline: int = 2,
        options: ConsumerOptions | None = None,
    ) -> Subscription:
        """Run ``handler`` on batches of up to ``max_batch`` messages matching ``pattern``.

        A batch is what is ready, or what arrived within ``max_wait`` seconds
        of its first message. Batches of one subscription run one at a time,
        in order. ``handler`` returns None (ack every delivery) or a mapping
        of failed deliveries to their exception; raising fails the whole
        batch (see :func:`squadbus.core.dispatch.wrap_batch`). Backends that
        are a :class:`~squadbus.core.backend.BatchSubscriber` hand batches
        over directly; on the others deliveries are gathered in-process, with
        up to ``pipeline`` batches fetched ahead.
        """
        self._check_open()
        subjects.validate_pattern(pattern)
        if group is not None:
            subjects.validate_token(group, what="group")
        if max_batch < 1 or pipeline < 1 or max_wait < 0:
            raise ConfigError("max_batch and pipeline must be >= 1, max_wait >= 0")
        base = options or self.consumer_options
        opts = dataclasses.replace(base, batch_size=max_batch, max_pending=max(base.max_pending, max_batch))
        if self.tracer is not None:
            handler = self.tracer.batch_handler(handler, pattern)
        raw = wrap_batch(handler, opts, self.backend.publish, self.stats)
        backend = self.backend
        sub: Subscription
        if isinstance(backend, BatchSubscriber):
            sub = await backend.subscribe_batch(pattern, raw, group=group, options=opts, max_wait=max_wait)
        else:
            ahead = dataclasses.replace(opts, max_in_flight=max_batch * pipeline)
            sub = await backend.subscribe(
                pattern, gather_batches(raw, options=ahead, max_wait=max_wait), group=group, options=ahead
            )
        self._subscriptions.append(sub)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Close one subscription made by this Bus (cancelled after ``close_timeout``, see :meth:`close`)."""
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
        errors = await self._finish("subscription", [sub.close()])
        if errors:
            raise errors[0]

    def inbox(
        self,
        agent_id: object,
        *,
        domains: Iterable[str] = (),
        broadcasts: bool = True,
        options: ConsumerOptions | None = None,
        handler: InboxHandler | None = None,
    ) -> Inbox:
        """The inbox of ``agent_id``: its direct messages, plus squad and domain broadcasts.

        Direct messages sent before the inbox was first opened wait for it
        (within what the backend retains: on a durable backend, also what an
        earlier run left unacked); broadcasts are received from the first
        opening on. Use ``async with bus.inbox("dev-1") as inbox:``, then
        ``async for delivery in inbox:`` and ``async with delivery:`` (see
        :class:`~squadbus.core.inbox.Inbox`). ``close()`` closes it if still open.

        ``handler`` instead of iterating: a plain function of the delivery is
        called inline as each one arrives, with no task per agent (the cheap way
        to host thousands of agents that react quickly); an ``async def`` is run
        by one task of the inbox. Returning acks, raising fails the delivery.
        """
        inbox = Inbox(self, str(agent_id), tuple(domains), broadcasts, options or self.consumer_options, handler)
        self._inboxes.add(inbox)
        return inbox

    async def inbox_placement(self) -> InboxPlacement | None:
        """Which agents this Bus may serve, where the backend places inboxes by partition (Kafka);
        None where any process can open any agent (see :mod:`squadbus.core.placement`)."""
        self._check_open()
        backend = self.backend
        return await backend.inbox_placement() if isinstance(backend, PlacesInboxes) else None

    @property
    def broadcast_hub(self) -> BroadcastHub:
        """The squad and domain broadcast subscriptions this Bus shares among its inboxes."""
        if self._broadcast_hub is None:
            group = f"{HOST_GROUP_PREFIX}{self.host_id}" if self.host_id else None
            self._broadcast_hub = BroadcastHub(self, group=group)
        return self._broadcast_hub

    # ---- request / reply --------------------------------------------------------------------

    async def _ensure_reply_subscription(self) -> None:
        if self._reply_sub is not None:
            return
        async with self._reply_lock:
            if self._reply_sub is not None:
                return

            async def on_reply(delivery: Delivery) -> None:
                correlation = delivery.message.headers.get(CORRELATION_ID)
                fut = self._pending_replies.pop(correlation or "", None)
                if fut is not None and not fut.done():
                    fut.set_result(delivery.message)

            pattern = f"{subjects.REPLY_PREFIX}.{self._reply_token}.*"
            options = ConsumerOptions(max_deliver=1, start=StartFrom.NEW)
            self._reply_sub = await self.subscribe(pattern, on_reply, options=options)

    async def request(
        self,
        sender_id: object,
        recipient_id: object,
        content: str,
        message_type: str = "request",
        *,
        timeout: float = 5.0,
        task_execution_id: UUID | str | None = None,
        metadata: dict[str, Any] | None = None,
        id: UUID | str | None = None,
    ) -> Message:
        """Send a request to ``recipient_id`` and wait for its reply.

        Raises :class:`~squadbus.core.errors.RequestTimeout` when no reply
        arrives within ``timeout`` seconds. The responder calls :meth:`reply`.
        """
        self._check_open()
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        message_id = envelope.new_id() if id is None else UUID(str(id))
        deadline = envelope.utcnow().timestamp() + timeout
        headers = {DEADLINE: f"{deadline:.6f}"}
        if not isinstance(self.backend, Requester):
            await self._ensure_reply_subscription()
            headers[REPLY_TO] = subjects.reply(self._reply_token, str(message_id))
        message = envelope.build(
            subject=subjects.direct(str(recipient_id)), sender_id=sender_id, recipient_id=recipient_id,
            content=content, message_type=message_type, task_execution_id=task_execution_id,
            metadata=metadata, id=message_id, headers=headers, max_content_bytes=self.max_content_bytes,
        )
        if self.tracer is None:
            return await self._request(message, timeout)
        with self.tracer.sending(message) as traced:  # the send span lasts until the reply
            return await self._request(traced, timeout)

    async def _request(self, message: Message, timeout: float) -> Message:
        backend = self.backend
        if isinstance(backend, Requester):
            return await backend.request(message, timeout=timeout)
        key = str(message.id)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending_replies[key] = fut
        try:
            await backend.publish(message)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            raise RequestTimeout(f"no reply from {message.recipient_id} within {timeout}s") from exc
        finally:
            self._pending_replies.pop(key, None)

    async def reply(
        self,
        request: Message,
        sender_id: object,
        content: str,
        message_type: str = "reply",
        *,
        metadata: dict[str, Any] | None = None,
        id: UUID | str | None = None,
    ) -> Message:
        """Answer ``request`` (a message that came from :meth:`request`).

        ``id`` as in :meth:`send`: a handler that may run again for the same request (a redelivery after
        it failed past its reply) passes the same id each time, and the backends' dedupe and the store
        keep one reply.
        """
        self._check_open()
        reply_to = request.headers.get(REPLY_TO)
        if not reply_to:
            raise ConfigError(f"message {request.id} has no {REPLY_TO} header: it is not a request")
        message = envelope.build(
            subject=reply_to, sender_id=sender_id, recipient_id=request.sender_id, content=content,
            message_type=message_type, task_execution_id=request.task_execution_id, metadata=metadata,
            headers={CORRELATION_ID: str(request.id)}, max_content_bytes=self.max_content_bytes, id=id,
        )
        if self.tracer is not None:
            # Outside any span (an inbox loop), the reply's parent is the request's creation context.
            with self.tracer.sending(message, parent_headers=request.headers) as traced:
                await self.backend.publish(traced)
                await self._log_native_reply(traced, request)
            return traced
        await self.backend.publish(message)
        await self._log_native_reply(message, request)
        return message

    async def _log_native_reply(self, reply: Message, request: Message) -> None:
        """Write a reply that went to a backend's own reply address (NATS ``_INBOX``, RabbitMQ direct
        reply-to: outside the log) to the log as well, under ``agent.reply.<backend>.<request id>``,
        so the history, the SSE and analytics workers and ``agent.reply.>`` groups see it as on every
        backend. The requester already has it: this costs the responder one more write, not the
        requester any latency. Same id, so the store keeps one row."""
        if reply.subject.startswith(subjects.ROOT + "."):
            return
        await self.backend.publish(reply.evolve(subject=subjects.reply(self.backend.name, str(request.id))))

    # ---- history ----------------------------------------------------------------------------

    def can_replay(self) -> bool:
        """True when the backend can replay an execution."""
        return isinstance(self.backend, Replayable)

    async def replay(
        self, task_execution_id: UUID | str, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(position, message)`` of one execution from the backend, in order.

        Raises ConfigError when the backend cannot replay (see :meth:`can_replay`);
        the full history is always in the HistoryStore.
        """
        self._check_open()
        backend = self.backend
        if not isinstance(backend, Replayable):
            raise ConfigError(f"backend {backend.name!r} cannot replay; query the history store instead")
        execution = task_execution_id if isinstance(task_execution_id, UUID) else UUID(str(task_execution_id))
        async for item in backend.replay(execution, from_seq=from_seq, since=since):
            yield item
