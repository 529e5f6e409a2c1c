"""The Backend protocol every transport implements, and its companions.

A backend moves :class:`~squadbus.core.envelope.Message` objects between
publishers and subscribers. Everything else (envelope building, retries,
dead letters, request/reply, inboxes) lives in :class:`squadbus.core.bus.Bus`
so that it behaves the same on every backend.

Extra abilities are separate protocols checked with ``isinstance``:
:class:`Replayable` (read one execution's history back from the broker),
:class:`ReadsAll` (read everything retained once, up to a snapshot of the end),
:class:`Requester` (a native request/reply faster than publish + reply subject),
:class:`BatchPublisher` (many messages in few round trips) and
:class:`BatchSubscriber` (deliveries handed over in batches).

A subscription's handlers are run by the consumer runtime
(:mod:`squadbus.core.consumer`) over a
:class:`~squadbus.core.source.DeliverySource` the backend opens: the memory
backend does; the others still run their own loops and move one at a time
(docs/design/inboxes.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable
from uuid import UUID

from squadbus.core import subjects
from squadbus.core.consumer import invoke, invoke_batch, settles_itself
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import ConfigError, MalformedMessage
from squadbus.core.tasks import cancel_and_wait

logger = logging.getLogger("squadbus.backend")

# invoke, invoke_batch and settles_itself live in squadbus.core.consumer; re-exported here for the code that
# imports them from this module (the inbox hubs, core.batching, core.dispatch, core.broadcasts).
__all__ = [
    "Backend",
    "BatchPublisher",
    "BatchRawHandler",
    "BatchSubscriber",
    "ConsumerOptions",
    "Delivery",
    "DescribesGroups",
    "FailurePolicy",
    "GroupFigures",
    "QueuedPublish",
    "RawHandler",
    "ReadsAll",
    "Replayable",
    "ReportsFigures",
    "Requester",
    "SlowConsumerPolicy",
    "StartFrom",
    "Subscription",
    "durable_name",
    "group_of",
    "invoke",
    "invoke_batch",
    "leases_kept",
    "publish_all",
    "read_back",
    "settles_itself",
]


class StartFrom(enum.Enum):
    """Where a consumer group that does not exist yet starts reading."""

    EARLIEST = "earliest"
    """Everything the backend still retains that matches (default for groups)."""
    NEW = "new"
    """Only messages published after the group was created."""


class SlowConsumerPolicy(enum.Enum):
    """What an in-process buffer does when a consumer falls behind."""

    BLOCK = "block"
    """The publisher waits for space: nothing is dropped (default)."""
    DROP_OLDEST = "drop_oldest"
    """The oldest buffered message is dropped and the next delivery reports the gap."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ConsumerOptions:
    """How a subscription consumes.

    ``max_deliver`` attempts are made before a message is dead-lettered;
    ``backoff_base``·2^(attempt-1) seconds, capped at ``backoff_max``, is the
    delay before a redelivery after a failure; ``ack_wait`` is how long a
    delivery may stay unsettled before the backend redelivers it to another
    member (consumer crashed or hung); ``batch_size`` is how many messages a
    backend fetches per round trip; ``max_pending`` bounds in-process buffers;
    ``max_in_flight`` is how many deliveries one subscription may hand to its
    handler at once (1 = strictly one at a time, the default; more lets a
    batching handler such as the db-writer collect a batch, at the cost of
    per-execution order *between* concurrent handler calls). ``take_over``: on
    start, take every message the group holds unacknowledged (its members
    died) before any new one, in order, instead of waiting ``ack_wait`` for
    them; only for a subscription that is its group's one member (the
    bridge), since it takes them from live members too. Backends whose groups
    resume from a committed position (Kafka) do this by nature.
    """

    max_deliver: int = 5
    backoff_base: float = 0.05
    backoff_max: float = 30.0
    ack_wait: float = 30.0
    batch_size: int = 256
    max_pending: int = 10_000
    max_in_flight: int = 1
    start: StartFrom = StartFrom.EARLIEST
    slow_consumer: SlowConsumerPolicy = SlowConsumerPolicy.BLOCK
    take_over: bool = False

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise ConfigError("max_deliver must be at least 1")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise ConfigError("need 0 <= backoff_base <= backoff_max")
        if self.ack_wait <= 0:
            raise ConfigError("ack_wait must be positive")
        if self.batch_size < 1 or self.max_pending < 1 or self.max_in_flight < 1:
            raise ConfigError("batch_size, max_pending and max_in_flight must be at least 1")

    def backoff(self, attempt: int) -> float:
        """Delay before redelivering a message whose attempt ``attempt`` failed."""
        return float(min(self.backoff_max, self.backoff_base * 2.0 ** max(0, attempt - 1)))


def durable_name(group: str, pattern: str) -> str:
    """A broker-safe durable name for the consumer group ``(group, pattern)``.

    A group is identified by its name *and* pattern: ``db-writer`` reading
    ``agent.>`` and ``db-writer`` reading ``agent.dlq.>`` are two groups. Names
    contain only ``[A-Za-z0-9_-]`` so every broker accepts them.
    """
    digest = hashlib.sha1(pattern.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in group)
    return f"{safe}-{digest}"


FailurePolicy = Callable[["Delivery", Exception], Awaitable[None]]
"""How a consumer settles a delivery whose handling raised (the Bus's: retry with backoff or dead-letter)."""


class Delivery:
    """One delivery of a message to one consumer.

    ``attempt`` is 1 on the first delivery. ``ack``, ``nack`` and ``term``
    are idempotent: the first call wins and returns True; later calls return
    False and never raise. ``gap_before`` counts messages this consumer lost
    just before this one under the ``DROP_OLDEST`` policy (0 otherwise).

    ``async with delivery:`` settles it by how the block ends: it returns →
    ack; it raises an ``Exception`` → :meth:`fail` (retried with backoff,
    dead-lettered after ``max_deliver``; the error is logged and does not
    propagate, so an agent's ``async for`` loop goes on to the next delivery);
    it is cancelled or interrupted → nack at once and the interruption goes on.
    A settle made inside the block wins.

    Backends subclass it and implement ``_ack``, ``_nack`` and ``_term``; a
    subclass that sets the fields itself sets ``_on_failure = None`` too.
    """

    __slots__ = ("_on_failure", "_settled", "_waiter", "attempt", "gap_before", "group", "message")

    def __init__(self, message: Message, *, attempt: int = 1, group: str | None = None, gap_before: int = 0) -> None:
        self.message = message
        self.attempt = attempt
        self.group = group
        self.gap_before = gap_before
        self._settled: str | None = None
        self._waiter: asyncio.Future[str] | None = None
        # Set by the Bus's handler wrapper (squadbus.core.dispatch) before the handler sees it.
        self._on_failure: FailurePolicy | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if exc is None:
            pending = self.ack_soon()
            if pending is not None:
                await pending
            return False
        if not isinstance(exc, Exception):
            # Cancelled or interrupted: nothing failed, give the message back now.
            await self.nack()
            return False
        await self.fail(exc)
        return self._on_failure is not None

    async def fail(self, error: Exception) -> None:
        """Settle as if the handling raised ``error``, by the consumer's policy.

        From a Bus (every subscription and inbox): :class:`~squadbus.core.errors.Reject`
        dead-letters now; ``Nack``/``Retry`` and any other error nack with the
        backoff, and dead-letter once ``max_deliver`` attempts were made; other
        errors are logged. Already settled: nothing changes (an unexpected
        error is logged). Without a Bus (a bare backend handler) it nacks at once.
        """
        on_failure = self._on_failure
        if on_failure is None:
            await self.nack()
            return
        await on_failure(self, error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._settled or "")

    def settled_future(self) -> asyncio.Future[str]:
        """A future resolved with the outcome once the delivery is settled."""
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
            if self._settled is not None:
                self._waiter.set_result(self._settled)
        return self._waiter

    @property
    def subject(self) -> str:
        """The subject the message was published on."""
        return self.message.subject

    @property
    def settled(self) -> str | None:
        """None while unsettled, else "ack", "nack" or "term"."""
        return self._settled

    async def ack(self) -> bool:
        """Mark the message processed. True if this call settled it."""
        if self._settled is not None:
            return False
        pending = self.ack_soon()
        if pending is not None:
            await pending
        return True

    def ack_soon(self) -> Awaitable[None] | None:
        """:meth:`ack` without a coroutine when the backend settles at once: returns None when done
        (or already settled), else an awaitable to wait for. For hot loops (the Bus's wrappers)."""
        if self._settled is not None:
            return None
        self._settled = "ack"
        try:
            pending = self._ack()
        except BaseException:
            if self._waiter is not None:
                self._wake()
            raise
        if pending is None:
            if self._waiter is not None:
                self._wake()
            return None
        return self._finish(pending)

    async def _finish(self, pending: Awaitable[None]) -> None:
        try:
            await pending
        finally:
            if self._waiter is not None:
                self._wake()

    async def nack(self, delay: float = 0.0) -> bool:
        """Ask for redelivery after ``delay`` seconds. True if this call settled it."""
        return await self._settle("nack", functools.partial(self._nack, max(0.0, delay)))

    async def term(self) -> bool:
        """Stop redelivering this message (it was dead-lettered). True if this call settled it."""
        return await self._settle("term", self._term)

    async def _settle(self, outcome: str, settle: Callable[[], Awaitable[None] | None]) -> bool:
        # nack and term (ack has its coroutine-free path in ack_soon): settle once, wake the waiter.
        if self._settled is not None:
            return False
        self._settled = outcome
        try:
            pending = settle()
            if pending is not None:
                await pending
        finally:
            if self._waiter is not None:
                self._wake()
        return True

    async def in_progress(self) -> None:
        """Tell the backend the handler is still working (extends ``ack_wait``)."""

    # The backend's side of settling. Each returns None when it settled at once (most backends
    # only update local state), or an awaitable to wait for (e.g. an ack sent over the network):
    # one coroutine less per message on the common path.

    def _ack(self) -> Awaitable[None] | None:
        raise NotImplementedError

    def _nack(self, delay: float) -> Awaitable[None] | None:
        raise NotImplementedError

    def _term(self) -> Awaitable[None] | None:
        return self._ack()


@contextlib.asynccontextmanager
async def leases_kept(deliveries: Sequence[Delivery], every: float) -> AsyncIterator[None]:
    """Extend the leases of ``deliveries`` (:meth:`Delivery.in_progress`) every ``every`` seconds while
    the block runs: work held longer than ``ack_wait`` (a destination or store outage, a broadcast's
    slow copies) is not handed to another member. A failed extension is logged and tried next time."""

    async def extend() -> None:
        while True:
            await asyncio.sleep(every)
            for delivery in deliveries:
                try:
                    await delivery.in_progress()
                except Exception as exc:  # the lease holds until ack_wait; try again next time
                    logger.warning("could not extend the lease of %s: %s", delivery.message.id, exc)
                    break

    keeper = asyncio.get_running_loop().create_task(extend())
    try:
        yield
    finally:
        await cancel_and_wait(keeper)


RawHandler = Callable[[Delivery], Awaitable[None]]
"""What a backend calls for each delivery; the Bus's wrapper always settles it."""

BatchRawHandler = Callable[[Sequence[Delivery]], Awaitable[None]]
"""What a :class:`BatchSubscriber` calls for each batch; the Bus's wrapper settles every delivery."""


class Subscription(Protocol):
    """A running consumer. ``close()`` stops fetching, lets the handler in
    progress finish and settle, and returns unsettled deliveries to the
    backend for redelivery; it is idempotent."""

    @property
    def pattern(self) -> str: ...

    @property
    def group(self) -> str | None: ...

    async def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A transport for messages.

    Contracts every implementation keeps (the conformance suite checks them):

    * ``connect()`` is called once before use; ``close()`` is idempotent,
      stops every subscription (see :class:`Subscription`) and flushes
      publishes in flight.
    * ``publish(message)`` returns only once the backend has stored the
      message (durable backends: acknowledged by the broker). It raises a
      :class:`~squadbus.core.errors.BackendError` subclass, never hangs
      beyond the backend's timeout. Concurrent calls are safe and may be
      batched.
    * ``subscribe(pattern, handler, group=..., options=...)``: with
      ``group=None`` every such subscription gets every matching message
      published after it started (fan-out, not durable); with a group name,
      members of the same ``(group, pattern)`` compete for messages and each
      message goes to one of them; different groups each get every message.
      A group that does not exist yet starts where ``options.start`` says.
      One subscription calls ``handler`` for up to ``options.max_in_flight``
      deliveries at a time (default one), starting them in the order the
      backend holds messages of one ``task_execution_id``.
    * A delivery not settled within ``options.ack_wait``, or whose consumer
      closed or died, is delivered again with ``attempt`` increased.
    """

    name: str

    async def connect(self) -> None: ...

    async def publish(self, message: Message) -> None: ...

    async def subscribe(
        self,
        pattern: str,
        handler: RawHandler,
        *,
        group: str | None,
        options: ConsumerOptions,
    ) -> Subscription: ...

    async def close(self) -> None: ...


@runtime_checkable
class ReportsFigures(Protocol):
    """A backend with figures of its own for ``/metrics`` (gauges named ``squadbus_backend_<key>``)."""

    def figures(self) -> Mapping[str, float]: ...


@runtime_checkable
class Replayable(Protocol):
    """A backend that can read one execution's messages back.

    ``replay`` yields ``(position, message)`` in publish order for
    ``task_execution_id``, starting at ``from_seq`` (a position returned by a
    previous replay, exclusive of nothing: positions >= from_seq) or at
    ``since`` (messages created at or after it).
    """

    def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]: ...


@runtime_checkable
class ReadsAll(Protocol):
    """A backend that can read back, once, everything it still retains.

    ``read_all`` yields every retained message whose subject matches
    ``pattern`` (and, with ``since``, whose ``created_at`` is at or after
    it), up to the end of each partition or stream as it was when the
    iteration started (a snapshot: nothing published later is waited for),
    then stops. Order is kept per ``task_execution_id``; there is none across
    partitions, and copies of one id are yielded as the broker holds them.
    It creates no consumer group; a temporary consumer it needs is deleted
    at the end, also when the iterator is closed early (close it with
    ``contextlib.aclosing``). Records that are not squadbus envelopes are
    skipped and their bytes handed to ``on_unreadable`` when given. Raises a
    BackendError (BackendTimeout when the broker stops answering short of
    the snapshot's end).
    """

    def read_all(
        self, pattern: str, *, since: datetime | None = None,
        on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]: ...


def read_back(
    data: bytes, pattern: str, since: datetime | None, on_unreadable: Callable[[bytes], None] | None
) -> Message | None:
    """The message in ``data`` if it is an envelope matching ``pattern`` and ``since`` (a ``read_all``
    step shared by the backends); unreadable bytes go to ``on_unreadable``."""
    try:
        message = decode(data, max_content_bytes=sys.maxsize)  # whatever its writer allowed
    except MalformedMessage:
        if on_unreadable is not None:
            on_unreadable(data)
        return None
    if not subjects.matches(pattern, message.subject) or (since is not None and message.created_at < since):
        return None
    return message


@runtime_checkable
class Requester(Protocol):
    """A backend with a native request/reply (e.g. NATS core request).

    ``request`` publishes ``message`` with ``headers["reply_to"]`` set to a
    subject of the backend's choosing and returns the first message
    published there. The responder answers with ``Bus.reply``, which
    publishes to that ``reply_to`` subject through ``Backend.publish`` (so
    ``publish`` must accept it), or raises
    :class:`~squadbus.core.errors.RequestTimeout` after ``timeout`` seconds.
    """

    async def request(self, message: Message, *, timeout: float) -> Message: ...


@runtime_checkable
class QueuedPublish(Protocol):
    """A backend whose publish queues the message and hands back what to await (a future), rather than
    being a coroutine of its own: :meth:`Bus.send` and :meth:`Bus.publish` then cost one coroutine
    frame less per message, which a waiting send keeps alive (Redis: ~1.5 µs of CPU per concurrent
    send, docs/backends/redis.md). ``enqueue`` has ``publish``'s contract: the awaitable completes
    once the message is stored, or raises what ``publish`` raises; errors before queueing (e.g.
    :class:`~squadbus.core.errors.Closed`) are raised by the call itself."""

    def enqueue(self, message: Message) -> Awaitable[object]: ...


@runtime_checkable
class BatchPublisher(Protocol):
    """A backend that stores many messages in fewer round trips than one publish each.

    ``publish_many(messages)`` returns once every message is stored, in list
    order for messages of one ``task_execution_id`` (a message retried after a
    transient failure may land after later ones). It raises a
    :class:`~squadbus.core.errors.BackendError` if any message was not stored;
    then any of them may have been: publishing the same messages again (same
    ids) is safe, the backend or the db-writer drops the repeats.
    """

    async def publish_many(self, messages: Sequence[Message]) -> None: ...


@runtime_checkable
class BatchSubscriber(Protocol):
    """A backend that hands a subscription's deliveries over in batches.

    ``subscribe_batch`` is ``subscribe`` (same groups, same delivery contract)
    except that ``handler`` gets a list of 1 to ``options.batch_size``
    deliveries: as many as are ready, waiting at most ``max_wait`` seconds
    after the first for more. One subscription runs one batch at a time, in
    order; a delivery the handler left unsettled is nacked (see
    :func:`invoke_batch`).
    """

    async def subscribe_batch(
        self,
        pattern: str,
        handler: BatchRawHandler,
        *,
        group: str | None,
        options: ConsumerOptions,
        max_wait: float,
    ) -> Subscription: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupFigures:
    """What a backend knows about one consumer group ``(group, subject)`` right now.

    ``lag``: messages the group has not been handed yet; ``pending``: handed
    out and not acknowledged yet (in a handler, or waiting for a redelivery);
    ``dead_letters``: dead letters of the group the backend still holds on
    ``agent.dlq.<group>``; ``redeliveries``: unacknowledged messages that were
    delivered more than once. ``None`` is "this backend cannot tell", never 0.
    """

    group: str
    subject: str
    lag: int | None
    pending: int | None
    dead_letters: int | None = None
    redeliveries: int | None = None


def group_of(durable: str) -> str | None:
    """The group part of a :func:`durable_name` (``None`` when ``durable`` is not one)."""
    head, sep, digest = durable.rpartition("-")
    if not sep or not head or len(digest) != 8 or any(c not in "0123456789abcdef" for c in digest):
        return None
    return head


@runtime_checkable
class DescribesGroups(Protocol):
    """A backend that reports its consumer groups (``/metrics``: ``squadbus_group_*``).

    ``group_figures`` returns one :class:`GroupFigures` per named group the
    broker knows, whichever process created it (not only this one's); it
    creates nothing and moves no offset. It raises a
    :class:`~squadbus.core.errors.BackendError` when the broker does not
    answer; callers bound it with a timeout of their own.
    """

    async def group_figures(self) -> Sequence[GroupFigures]: ...


async def publish_all(backend: Backend, messages: Sequence[Message]) -> None:
    """Store ``messages`` with the backend's batch publish, or one after the other in order."""
    if len(messages) > 1 and isinstance(backend, BatchPublisher):
        await backend.publish_many(messages)
        return
    for message in messages:
        await backend.publish(message)
