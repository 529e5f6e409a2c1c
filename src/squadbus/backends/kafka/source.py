"""A Kafka subscription's source of deliveries: fetching, handing out, settling.

:class:`KafkaSubscription` is the :class:`~squadbus.core.source.DeliverySource`
of one subscription (the contract is in :mod:`.consumer`'s docstring): its
fetch loop fills each partition's queue (:mod:`.partition`), ``poll`` and
``receive`` hand out decoded records of the partitions that are ready,
``ack``/``nack`` settle them in their partition, and undecodable records are
dead-lettered by a task of the source. Joining, rebalances and commits are its
base class's (:mod:`.membership`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from squadbus.backends.kafka._driver import AIOKafkaConsumer, ConsumerRecord, KafkaError, TopicPartition
from squadbus.backends.kafka.deadletter import malformed_dead_letter
from squadbus.backends.kafka.ends import high_watermarks_now
from squadbus.backends.kafka.membership import GroupMembership, _leave_even_from_generation_zero, _Listener
from squadbus.backends.kafka.partition import GAP_RETRY_DELAY, PartitionState, header_subject
from squadbus.backends.kafka.producer import ID_HEADER, translate
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.consumer import FAIRNESS_STREAK
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import Closed, MalformedMessage, SquadbusError
from squadbus.core.source import within
from squadbus.core.tasks import cancel_and_wait, wait_ended

if TYPE_CHECKING:
    from squadbus.backends.kafka.consumer import KafkaConsumer

logger = logging.getLogger("squadbus.backends.kafka")

_POLL_MS = 1000


class KafkaDelivery(Delivery):
    """A delivery of one Kafka record; ack/nack settle it in its partition's bookkeeping."""

    __slots__ = ("_part", "_record", "_sub")

    def __init__(
        self, message: Message, *, attempt: int, group: str | None,
        sub: KafkaSubscription, part: PartitionState, record: ConsumerRecord,
    ) -> None:
        # Delivery's fields set here rather than through super().__init__: one call less per record.
        self.message = message
        self.attempt = attempt
        self.group = group
        self.gap_before = 0
        self._settled = None
        self._waiter = None
        self._on_failure = None
        self._sub = sub
        self._part = part
        self._record = record

    @property
    def offset(self) -> tuple[str, int, int]:
        """``(topic, partition, offset)`` of the record."""
        return (self._record.topic, self._record.partition, self._record.offset)

    def _ack(self) -> None:
        self._sub._settle(self._part, self._record)

    def _nack(self, delay: float) -> None:
        self._sub._retry(self._part, self._record, delay, self.attempt)


class KafkaSubscription(GroupMembership):
    """One member of a consumer group (or a consumer without a group): a
    :class:`~squadbus.core.source.DeliverySource` over the records it fetched, run by core's
    :class:`~squadbus.core.consumer.Consumer` (:attr:`runtime`); its contract is in :mod:`.consumer`'s docstring.

    ``poll`` hands out the next records of the partitions that are ready (not held by a nack's delay, not
    being revoked; one at a time per partition unless ``concurrent``), staying on one partition for up to
    :data:`~squadbus.core.consumer.FAIRNESS_STREAK` records in a row (cheaper than a scan), and decodes
    there; undecodable records go to a dead-letter task of the source, never handed out."""

    def __init__(
        self, *, settings: KafkaSettings, layout: TopicLayout, pattern: str, group: str | None,
        options: ConsumerOptions, dead_letter: Callable[[Message], Awaitable[None]],
        on_close: Callable[[KafkaSubscription], None], concurrent: bool = False,
    ) -> None:
        self._settings = settings
        self._joined = asyncio.Event()
        self._topics = layout.topics_for(pattern)
        self._pattern = pattern
        self._group = group
        self._options = options
        # Several records of one partition may be handed out before the first settles (max_in_flight > 1,
        # batches); one at a time, a partition waits for its record to settle.
        self._one_at_a_time = not concurrent and options.max_in_flight == 1
        self._dead_letter = dead_letter
        self._on_close = on_close
        self._consumer: AIOKafkaConsumer | None = None
        self._parts: dict[TopicPartition, PartitionState] = {}
        self._order: list[PartitionState] = []
        self._cursor = 0
        self._last: PartitionState | None = None  # poll(1) stays on it for up to FAIRNESS_STREAK records
        self._stay = 0
        self._buffered = 0
        self._matched: dict[bytes, bool] = {}  # subject header -> matches the pattern (PartitionState.add)
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._snapshot: dict[TopicPartition, int] = {}
        # The one consumer's wait in receive(): resolved when records are queued or settled (or on close).
        self._waiter: asyncio.Future[None] | None = None
        self._space = asyncio.Event()  # set when the fetch loop, waiting (_fetch_waits), may fetch again
        self._fetch_waits = False
        self._commit_wanted = asyncio.Event()
        self._fetch_task: asyncio.Task[None] | None = None
        self._commit_task: asyncio.Task[None] | None = None
        self._dead_letters: set[asyncio.Task[None]] = set()
        # Set on settles while a revocation waits for in-flight records (_revoking > 0).
        self._progress = asyncio.Event()
        self._revoking = 0
        self._closing = False
        self._clock = asyncio.get_running_loop().time
        self.runtime: KafkaConsumer | None = None
        """The consumer runtime over this source (set by core's Consumer); the backend closes it."""

    @property
    def pattern(self) -> str:
        """The subject pattern."""
        return self._pattern

    @property
    def group(self) -> str | None:
        """The squadbus group name (None for an ephemeral subscription)."""
        return self._group

    # ---- start and stop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start fetching (the runtime starts after); raises a BackendError if the broker is
        unreachable."""
        s, options = self._settings, self._options
        consumer = AIOKafkaConsumer(
            bootstrap_servers=list(s.bootstrap_servers),
            client_id=s.client_id,
            group_id=self.kafka_group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if options.start is StartFrom.EARLIEST else "latest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_poll_records=options.batch_size,
        )
        self._consumer = consumer
        try:
            async with asyncio.timeout(s.connect_timeout):
                await consumer.start()
                if self._group is None:
                    await self._assign_at_end(consumer)
                else:
                    if options.start is StartFrom.NEW:
                        self._snapshot = await high_watermarks_now(s, await self._all_partitions(consumer))
                    consumer.subscribe(self._topics, listener=_Listener(self))
        except (KafkaError, TimeoutError) as exc:
            await consumer.stop()
            raise translate(exc, f"subscribe to {self._pattern}") from exc
        loop = asyncio.get_running_loop()
        name = self.kafka_group_id or "ephemeral"
        self._fetch_task = loop.create_task(self._fetch_loop(), name=f"squadbus-kafka-fetch-{name}")
        if self._group is not None:
            self._commit_task = loop.create_task(self._commit_loop(), name=f"squadbus-kafka-commit-{name}")
            if self._settings.join_wait:
                await self._wait_joined()

    async def close(self) -> None:
        """Called by the runtime once its handlers finished: stop fetching, finish the dead letters in
        progress, commit, leave the group. Idempotent. Cancelled meanwhile (the dead letters in progress are
        then cancelled too), it still commits and leaves, then raises CancelledError."""
        if self._closing:
            return
        self._closing = True
        self._notify()
        self._space.set()
        try:
            await cancel_and_wait(self._fetch_task)
            with contextlib.suppress(Exception):  # as before, closing goes on whatever a dead letter raised
                await wait_ended(*self._dead_letters)
        finally:
            await self._commit_and_leave()

    async def _commit_and_leave(self) -> None:
        """close()'s clean-up once fetching stopped: stop the commit loop, commit, leave the group."""
        try:
            if self._commit_task is not None:
                try:
                    await cancel_and_wait(self._commit_task)
                finally:
                    if not self._commit_task.done():
                        await asyncio.wait((self._commit_task,))  # re-cancelled with the caller
                    await self._commit_now()
        finally:
            await self._leave()

    async def _leave(self) -> None:
        """Leave the group (even from generation zero) and stop the driver's consumer; forget the subscription."""
        if self._consumer is not None:
            _leave_even_from_generation_zero(self._consumer)
            try:
                await self._consumer.stop()
            except KafkaError as exc:
                logger.warning("stopping the consumer of %s failed: %s", self.kafka_group_id or self._pattern, exc)
        self._on_close(self)

    # ---- fetching ----------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        options = self._options
        while not self._closing:
            if self._buffered >= options.max_pending:
                self._space.clear()
                self._fetch_waits = True
                await self._space.wait()
                continue
            try:
                batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=options.batch_size)
            except KafkaError as exc:
                logger.warning("fetch for %s failed, retrying: %s", self.kafka_group_id or self._pattern, exc)
                await asyncio.sleep(0.5)
                continue
            moved = again = False
            now = self._clock()
            for tp, fetched in batch.items():
                part = self._parts.get(tp)
                if part is None:
                    # Assigned but not set up yet (a rebalance is running): fetch it again later.
                    consumer.seek(tp, fetched[0].offset)
                    continue
                expected = part.next_offset
                records, missing = part.gaps.take(fetched, fetched[0].offset if expected is None else expected,
                                                       now)
                if missing is not None:  # the fetch skipped an offset: read the partition again from it
                    consumer.seek(tp, missing)
                    again = True
                before = part.floor
                self._buffered += part.add(records, self._pattern, self._matched)
                moved = moved or part.floor != before
            if moved and self._group is not None:
                self._commit_wanted.set()
            self._notify()
            if again:
                await asyncio.sleep(GAP_RETRY_DELAY)

    # ---- handing out (DeliverySource) --------------------------------------------------------

    def poll(self, max_count: int) -> Sequence[Delivery]:
        """Up to ``max_count`` deliveries of the partitions that are ready, decoded here, in offset order per
        partition; undecodable records go to a dead-letter task instead (not counted in ``max_count``)."""
        if self._closing or not self._buffered:
            return ()
        now = self._clock()
        if max_count == 1:  # one delivery at a time, the hot path: no list
            while (picked := self._pick(now)) is not None:
                delivery = self._delivery_of(*picked)
                if isinstance(delivery, KafkaDelivery):
                    return (delivery,)
                self._dead_letter_task(*picked, *delivery)
            return ()
        got: list[Delivery] = []
        while len(got) < max_count and (picked := self._pick(now)) is not None:
            delivery = self._delivery_of(*picked)
            if isinstance(delivery, KafkaDelivery):
                got.append(delivery)
            else:
                self._dead_letter_task(*picked, *delivery)
        return got

    def _pick(self, now: float) -> tuple[PartitionState, ConsumerRecord] | None:
        """The next record to hand out: from the partition of the last one for up to FAIRNESS_STREAK
        records in a row while it is ready (cheaper than a scan, still fair), else from the next ready
        partition after it."""
        one_at_a_time = self._one_at_a_time
        part = self._last
        if part is not None and self._stay and part.ready(now, one_at_a_time):
            self._stay -= 1
            return part, self._take(part)
        order = self._order
        count = len(order)
        for i in range(count):
            index = (self._cursor + i) % count
            part = order[index]
            if part.ready(now, one_at_a_time):
                self._cursor = index + 1
                self._last = part
                self._stay = FAIRNESS_STREAK - 1
                return part, self._take(part)
        return None

    def _take(self, part: PartitionState) -> ConsumerRecord:
        part.inflight += 1
        self._buffered -= 1
        if self._fetch_waits and self._buffered < self._options.max_pending:
            self._fetch_waits = False
            self._space.set()
        return part.queue.popleft()

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        if self._closing:
            raise Closed(f"the subscription to {self._pattern!r} is closed")
        got = self.poll(max_count)
        if got or wait <= 0:
            return got
        now = self._clock()
        held = [p.blocked_until for p in self._order if p.queue and p.blocked_until > now]
        if held:  # a nacked record's delay ends: its partition is ready again
            wait = min(wait, min(held) - now)
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await within(waiter, wait)
        finally:
            self._waiter = None
        return self.poll(max_count)

    def _notify(self) -> None:
        """Wake the consumer waiting in :meth:`receive`, if it does."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Back at the front of their partitions, as never handed out (the attempt is not counted)."""
        attempts = self._attempts
        for delivery in reversed(deliveries):
            assert isinstance(delivery, KafkaDelivery)
            part, record = delivery._part, delivery._record
            part.inflight -= 1
            if delivery.attempt > 1:
                attempts[(record.topic, record.partition, record.offset)] = delivery.attempt - 1
            if not part.revoked:
                part.requeue(record, 0.0)
                self._buffered += 1
        if self._revoking:
            self._progress.set()
        self._notify()

    def _dead_letter_task(self, part: PartitionState, record: ConsumerRecord, attempt: int, reason: str) -> None:
        """Dead-letter an undecodable record in a task (awaited by close()): ``poll`` never waits."""
        task = asyncio.get_running_loop().create_task(
            self._dead_letter_malformed(part, record, attempt, reason),
            name=f"squadbus-kafka-{self.kafka_group_id or 'ephemeral'}-malformed")
        self._dead_letters.add(task)
        task.add_done_callback(self._dead_letters.discard)

    def _delivery_of(self, part: PartitionState, record: ConsumerRecord) -> KafkaDelivery | tuple[int, str]:
        """The delivery of ``record``, or ``(attempt, why)`` when it is not an envelope (synchronous:
        the common path costs no coroutine)."""
        # Only records that were nacked have an entry: the common path costs one truth test.
        attempts = self._attempts
        attempt = attempts.pop((record.topic, record.partition, record.offset), 0) + 1 if attempts else 1
        value = record.value
        try:
            if value is None:
                raise MalformedMessage("a record without a value (tombstone)")
            message = decode(value)
        except MalformedMessage as exc:
            return attempt, str(exc)
        return KafkaDelivery(message, attempt=attempt, group=self._group, sub=self, part=part, record=record)

    async def _dead_letter_malformed(
        self, part: PartitionState, record: ConsumerRecord, attempt: int, reason: str
    ) -> None:
        record_id = next((bytes(v).decode("utf-8", "replace") for k, v in record.headers or () if k == ID_HEADER), None)
        dead = malformed_dead_letter(
            record, group=self._group, attempt=attempt, reason=reason,
            subject=header_subject(record), record_id=record_id,
        )
        try:
            await self._dead_letter(dead)
        except SquadbusError:
            logger.exception(
                "dead-lettering malformed record %s[%d]@%d failed; retrying it", record.topic, record.partition,
                record.offset,
            )
            self._retry(part, record, self._options.backoff(attempt), attempt)
            return
        logger.warning(
            "dead-lettered malformed record %s[%d]@%d of group %s to %s: %s",
            record.topic, record.partition, record.offset, self._group, dead.subject, reason,
        )
        self._settle(part, record)

    def _settle(self, part: PartitionState, record: ConsumerRecord) -> None:
        part.inflight -= 1
        if part.settle(record.offset) and self._group is not None and not part.revoked:
            self._commit_wanted.set()
        if self._waiter is not None:
            self._notify()
        if self._revoking:
            self._progress.set()

    def _retry(self, part: PartitionState, record: ConsumerRecord, delay: float, attempt: int) -> None:
        part.inflight -= 1
        if self._revoking:
            self._progress.set()
        key = (record.topic, record.partition, record.offset)
        self._attempts[key] = attempt
        if part.revoked or self._closing:
            # The partition moved on: its next owner re-reads from the committed offset
            # (and counts from 1 unless it is this member again).
            return
        part.requeue(record, self._clock() + delay)
        self._buffered += 1
        self._notify()
