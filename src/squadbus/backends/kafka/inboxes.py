"""Inboxes multiplexed per Bus on Kafka (design K2, docs/design/inboxes.md).

A direct message is also written to the inbox topic keyed by its recipient
(:mod:`.producer`), so one agent's messages are in one partition, in publish
order. A Bus serves every inbox it opens through **one** consumer in the group
``inbox_group`` reading that topic: opening an inbox registers the agent,
records are demultiplexed by key to the open inbox, and each agent gets one
delivery at a time (a nacked one comes back, after its delay, before anything
later). Broker cost per Bus: one group member and its connections, however many
inboxes are open.

* **Placement.** Only the member the group assigned a partition reads it, so a
  host serves the agents of its partitions (:meth:`KafkaInboxHub.placement`;
  ``inbox_hosts``/``inbox_host`` fix the split, see :mod:`.inbox_assignor`). An
  inbox opened for an agent of a partition this Bus does not own gets nothing
  until the group gives this Bus that partition (say its owner leaves): it waits.
* **Commits** follow the partition's settled floor (:mod:`.partition`): an
  offset is committed once every record before it is settled.
* **Sent before the first open.** A record for an agent whose inbox is not
  open here is not delivered and not settled: the floor stays before it and
  only its offset is remembered (no body). When the agent opens, its partition
  is read again from its first such offset; records already handled are skipped.
  A record unclaimed for ``inbox_unclaimed_ms`` is released (settled
  undelivered, logged) so one agent that never opens cannot hold its partition's
  commits forever.
* **Crash.** A killed host's partitions go to the others after the session
  timeout and are read from the committed floor: what it had not settled is
  delivered again (as are records after the floor that others had settled:
  duplicates, never loss). Attempts are counted in memory per record, so they
  restart at 1 on another member.
* **Two opens** of an agent in one Bus: the first holder is served, the next
  takes over when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from squadbus.backends.kafka._driver import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    IllegalStateError,
    KafkaError,
    TopicPartition,
)
from squadbus.backends.kafka.consumer import _leave_even_from_generation_zero
from squadbus.backends.kafka.deadletter import malformed_dead_letter
from squadbus.backends.kafka.inbox_assignor import InboxAssignor
from squadbus.backends.kafka.partition import GAP_RETRY_DELAY, PartitionState, commit_floors, header_subject
from squadbus.backends.kafka.partitioner import partition_for
from squadbus.backends.kafka.producer import ID_HEADER, translate
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, RawHandler, invoke
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import Closed, MalformedMessage, SquadbusError
from squadbus.core.inbox_source import InboxHolder
from squadbus.core.placement import InboxPlacement
from squadbus.core.tasks import cancel_and_wait

logger = logging.getLogger("squadbus.backends.kafka.inboxes")

_POLL_MS = 1000
_FETCH_MAX = 500
_DEFAULTS = ConsumerOptions()


class _Part:
    """One owned partition of the inbox topic: its commit floor, what is unclaimed, what to read again."""

    __slots__ = ("high", "inflight", "revoked", "state", "unclaimed", "wanted")

    def __init__(self, tp: TopicPartition) -> None:
        self.state = PartitionState(tp)
        self.high = -1  # the next offset never seen: below it a record is a re-read
        self.unclaimed: dict[str, list[tuple[int, int]]] = {}  # agent -> [(offset, timestamp ms)]
        self.wanted: dict[int, str] = {}  # offsets to hand out when re-read -> agent
        self.inflight = 0
        self.revoked = False

    def done_now(self, offset: int) -> None:
        """Settle ``offset`` at once (a record nobody will get)."""
        self.state.outstanding.append(offset)
        self.state.settle(offset)


class _Agent:
    """An open agent: its holders (the first is served) and its queue of records."""

    __slots__ = ("blocked_until", "busy", "holders", "id", "queue", "subject")

    def __init__(self, agent_id: str) -> None:
        self.id = agent_id
        self.subject = subjects.direct(agent_id)
        self.holders: list[InboxHolder[_Agent]] = []
        self.queue: deque[tuple[_Part, ConsumerRecord]] = deque()
        self.busy = False
        self.blocked_until = 0.0


class KafkaInboxDelivery(Delivery):
    """One inbox record handed to an agent; ack settles it in its partition's floor."""

    __slots__ = ("_hub", "_part", "_record")

    def __init__(self, message: Message, attempt: int, group: str, hub: KafkaInboxHub, part: _Part,
                 record: ConsumerRecord) -> None:
        super().__init__(message, attempt=attempt, group=group)
        self._hub, self._part, self._record = hub, part, record

    @property
    def offset(self) -> tuple[str, int, int]:
        """``(topic, partition, offset)`` of the inbox record."""
        return (self._record.topic, self._record.partition, self._record.offset)

    def _ack(self) -> None:
        self._hub._settle(self._part, self._record.offset)

    def _nack(self, delay: float) -> None:
        self._hub._retry(self._part, self._record, delay, self.attempt)


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, hub: KafkaInboxHub) -> None:
        self._hub = hub

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._hub._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._hub._on_assigned(assigned)


class KafkaInboxHub:
    """Every open inbox of one Bus, served by one member of the inbox group (see the module docstring)."""

    def __init__(self, settings: KafkaSettings, dead_letter: Callable[[Message], Awaitable[None]]) -> None:
        self._settings = settings
        self._topic = settings.inbox_topic
        self._dead_letter = dead_letter
        self._agents: dict[str, _Agent] = {}
        self._parts: dict[int, _Part] = {}
        self._attempts: dict[tuple[int, int], int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._starting = asyncio.Lock()
        self._assigned = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._buffered = 0
        self._partition_ids: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._handling: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def members(self) -> int:
        """Group members this hub holds: 1 once an inbox was opened, else 0."""
        return 0 if self._consumer is None or self._closed else 1

    # ---- opening and closing inboxes ---------------------------------------------------------

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> InboxHolder[_Agent]:
        """Serve ``agent_id``'s inbox to ``handler`` (see ``MultiplexesInboxes.open_inbox``)."""
        if self._closed:
            raise Closed("kafka backend is closed")
        subjects.validate_token(agent_id, what="agent_id")
        await self._start()
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(agent_id)
        holder = InboxHolder(self, agent, handler, group, options)
        agent.holders.append(holder)
        if len(agent.holders) == 1:
            self._claim(agent)
        return holder

    async def close_holder(self, holder: InboxHolder[_Agent]) -> None:
        """Close one open of an agent; the last one out hands its queued records back (unclaimed)."""
        if not holder.leave():
            return
        agent = holder.agent
        if agent.holders:
            self._kick(agent)
            return
        if self._agents.get(agent.id) is agent:
            del self._agents[agent.id]
        queued, agent.queue = agent.queue, deque()
        self._take_buffered(len(queued))
        for part, record in queued:
            self._unclaim(part, agent.id, record)

    def _claim(self, agent: _Agent) -> None:
        """The agent opened here: read again what its owned partitions left unclaimed for it."""
        consumer = self._consumer
        for part in self._parts.values():
            offsets = part.unclaimed.pop(agent.id, None)
            if not offsets or consumer is None:
                continue
            for offset, _ in offsets:
                part.wanted[offset] = agent.id
            try:
                consumer.seek(part.state.tp, min(part.wanted))
            except IllegalStateError:  # being revoked: its next owner reads from the committed floor
                continue

    # ---- placement ---------------------------------------------------------------------------

    def partition_of(self, agent_id: str) -> int:
        """The inbox partition of ``agent_id`` (the producer's murmur2 of the agent id)."""
        ids = self._partition_ids or list(range(self._settings.partitions))
        return partition_for(agent_id.encode(), ids)

    async def placement(self) -> InboxPlacement:
        """Join the inbox group if not yet (at most ``join_timeout``), then the partitions owned now."""
        if self._closed:
            raise Closed("kafka backend is closed")
        await self._start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.join_timeout):
                await self._assigned.wait()
        count = len(self._partition_ids) or self._settings.partitions
        return InboxPlacement(partitions=count, owned=frozenset(self._parts), partition_of=self.partition_of)

    # ---- the consumer ------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._consumer is not None:
            return
        async with self._starting:
            if self._consumer is not None:
                return
            s = self._settings
            consumer = AIOKafkaConsumer(
                bootstrap_servers=list(s.bootstrap_servers), client_id=s.client_id, group_id=s.inbox_group,
                enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=s.session_timeout_ms, heartbeat_interval_ms=s.heartbeat_interval_ms,
                max_poll_interval_ms=s.max_poll_interval_ms, fetch_max_wait_ms=s.fetch_max_wait_ms,
                partition_assignment_strategy=(InboxAssignor(s.inbox_host, s.inbox_hosts),),
            )
            try:
                async with asyncio.timeout(s.connect_timeout):
                    await consumer.start()
                    await consumer.topics()  # metadata: the inbox topic's partitions
                    self._partition_ids = sorted(consumer.partitions_for_topic(self._topic) or ())
                    consumer.subscribe([self._topic], listener=_Listener(self))
            except (KafkaError, TimeoutError) as exc:
                await consumer.stop()
                raise translate(exc, f"join the inbox group {s.inbox_group}") from exc
            self._consumer = consumer
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._fetch_loop(consumer), name="squadbus-kafka-inbox-fetch"),
                loop.create_task(self._commit_loop(), name="squadbus-kafka-inbox-commit"),
                loop.create_task(self._watch_join(), name="squadbus-kafka-inbox-join"),
            ]

    async def _watch_join(self) -> None:
        """Say so once when the group has not assigned this member anything within ``join_timeout``."""
        s = self._settings
        try:
            async with asyncio.timeout(s.join_timeout):
                await self._assigned.wait()
        except TimeoutError:
            logger.warning(
                "inbox group %s has not assigned this Bus its partitions within %.0f s: its inboxes get nothing "
                "until it does (tansu 0.6 can leave a group waiting for a leader that is gone: restart the broker "
                "or set another inbox_group)", s.inbox_group, s.join_timeout)

    async def close(self) -> None:
        """Stop fetching, give back what is queued, commit, leave the group. Idempotent. Cancelled meanwhile,
        it still ends its tasks and handlers, commits and leaves, then raises CancelledError."""
        if self._closed:
            return
        self._closed = True
        self._space.set()
        try:
            for agent in list(self._agents.values()):
                for holder in list(agent.holders):
                    await self.close_holder(holder)
        finally:
            tasks = [*self._tasks, *self._handling]
            try:
                # A handler cancelled while unsettled nacks its delivery (core.backend.invoke).
                await cancel_and_wait(*tasks)
            finally:
                await self._commit_and_leave()

    async def _commit_and_leave(self) -> None:
        """close()'s clean-up once the tasks and handlers ended: commit, leave the group."""
        consumer = self._consumer
        if consumer is None:
            return
        await self._commit_now(list(self._parts.values()))
        _leave_even_from_generation_zero(consumer)
        try:
            await consumer.stop()
        except KafkaError as exc:
            logger.warning("stopping the inbox consumer failed: %s", exc)

    async def _fetch_loop(self, consumer: AIOKafkaConsumer) -> None:
        max_pending = _DEFAULTS.max_pending
        clock = asyncio.get_running_loop().time
        while not self._closed:
            if self._buffered >= max_pending:
                self._space.clear()
                await self._space.wait()
                continue
            try:
                batch = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_FETCH_MAX)
            except KafkaError as exc:
                logger.warning("inbox fetch failed, retrying: %s", exc)
                await asyncio.sleep(0.5)
                continue
            except Exception:  # a bug must not stop every inbox of the Bus: log it, fetch again
                logger.exception("inbox fetch of %s failed unexpectedly, retrying", self._topic)
                await asyncio.sleep(0.5)
                continue
            moved = again = False
            now = clock()
            for tp, fetched in batch.items():
                part = self._parts.get(tp.partition)
                if part is None or part.revoked:
                    continue
                records, missing = part.state.gaps.take(
                    fetched, fetched[0].offset if part.high < 0 else part.high, now)
                if missing is not None:  # the fetch skipped an offset: read the partition again from it
                    consumer.seek(tp, missing)
                    again = True
                floor = part.state.floor
                for record in records:
                    self._route(part, record)
                moved = moved or part.state.floor != floor
            if moved:
                self._commit_wanted.set()
            if again:
                await asyncio.sleep(GAP_RETRY_DELAY)

    def _route(self, part: _Part, record: ConsumerRecord) -> None:
        offset = record.offset
        if offset < part.high:
            agent_id = part.wanted.pop(offset, None)
            if agent_id is None:
                return  # handled or held already: a re-read for another agent
        else:
            part.high = offset + 1
            try:
                agent_id = bytes(record.key).decode() if record.key is not None else ""
            except UnicodeDecodeError:
                agent_id = ""
            if not agent_id:
                logger.warning("inbox record %s[%d]@%d has no agent key; skipped", record.topic, record.partition,
                               offset)
                part.done_now(offset)
                return
            part.state.outstanding.append(offset)
        agent = self._agents.get(agent_id)
        if agent is None or not agent.holders:
            self._unclaim(part, agent_id, record)
            return
        agent.queue.append((part, record))
        self._buffered += 1
        self._kick(agent)

    def _unclaim(self, part: _Part, agent_id: str, record: ConsumerRecord) -> None:
        if part.revoked:
            return
        part.unclaimed.setdefault(agent_id, []).append((record.offset, record.timestamp))

    def _take_buffered(self, count: int) -> None:
        self._buffered -= count
        if self._buffered < _DEFAULTS.max_pending:
            self._space.set()

    # ---- handing records to agents -----------------------------------------------------------

    def _kick(self, agent: _Agent) -> None:
        if agent.busy or not agent.queue or not agent.holders or self._closed:
            return
        agent.busy = True
        task = asyncio.get_running_loop().create_task(self._serve(agent))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _serve(self, agent: _Agent) -> None:
        loop = asyncio.get_running_loop()
        try:
            while agent.queue and agent.holders and not self._closed:
                wait = agent.blocked_until - loop.time()
                if wait > 0:
                    loop.call_later(wait, self._kick, agent)
                    return
                part, record = agent.queue.popleft()
                self._take_buffered(1)
                if part.revoked:
                    continue
                await self._deliver(agent.holders[0], part, record)
        finally:
            agent.busy = False

    async def _deliver(self, holder: InboxHolder[_Agent], part: _Part, record: ConsumerRecord) -> None:
        attempts = self._attempts
        attempt = attempts.pop((record.partition, record.offset), 0) + 1 if attempts else 1
        part.inflight += 1
        try:
            if record.value is None:
                raise MalformedMessage("a record without a value (tombstone)")
            message = decode(record.value)
        except MalformedMessage as exc:
            await self._dead_letter_malformed(holder, part, record, attempt, str(exc))
            return
        await invoke(holder.handler, KafkaInboxDelivery(message, attempt, holder.group, self, part, record),
                     holder.options)

    async def _dead_letter_malformed(
        self, holder: InboxHolder[_Agent], part: _Part, record: ConsumerRecord, attempt: int, reason: str
    ) -> None:
        record_id = next((bytes(v).decode("utf-8", "replace") for k, v in record.headers or () if k == ID_HEADER), None)
        dead = malformed_dead_letter(record, group=holder.group, attempt=attempt, reason=reason,
                                     subject=header_subject(record), record_id=record_id)
        try:
            await self._dead_letter(dead)
        except SquadbusError:
            logger.exception("dead-lettering malformed inbox record %s[%d]@%d failed; retrying it",
                             record.topic, record.partition, record.offset)
            self._retry(part, record, holder.options.backoff(attempt), attempt)
            return
        logger.warning("dead-lettered malformed inbox record %s[%d]@%d to %s: %s", record.topic, record.partition,
                       record.offset, dead.subject, reason)
        self._settle(part, record.offset)

    def _settle(self, part: _Part, offset: int) -> None:
        part.inflight -= 1
        self._progress.set()
        if part.state.settle(offset) and not part.revoked:
            self._commit_wanted.set()

    def _retry(self, part: _Part, record: ConsumerRecord, delay: float, attempt: int) -> None:
        part.inflight -= 1
        self._progress.set()
        if part.revoked or self._closed:
            return  # the next owner reads it again from the committed floor
        self._attempts[(record.partition, record.offset)] = attempt
        agent_id = bytes(record.key).decode()
        agent = self._agents.get(agent_id)
        if agent is None or not agent.holders:
            self._unclaim(part, agent_id, record)
            return
        agent.queue.appendleft((part, record))
        self._buffered += 1
        agent.blocked_until = asyncio.get_running_loop().time() + delay
        self._kick(agent)

    # ---- commits, releases and rebalances ----------------------------------------------------

    async def _commit_loop(self) -> None:
        every = min(60.0, self._settings.inbox_unclaimed_ms / 10_000)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._commit_wanted.wait()
            self._commit_wanted.clear()
            self._release_unclaimed()
            if not await self._commit_now(list(self._parts.values())):
                await asyncio.sleep(0.2)
                self._commit_wanted.set()
            await asyncio.sleep(self._settings.commit_interval_ms / 1000)  # what settles meanwhile: one commit

    def _release_unclaimed(self) -> None:
        """Settle records whose agent has not opened here within ``inbox_unclaimed_ms`` (logged)."""
        cutoff = int(time.time() * 1000) - self._settings.inbox_unclaimed_ms
        for part in self._parts.values():
            released = 0
            for agent_id in list(part.unclaimed):
                kept = [(o, ts) for o, ts in part.unclaimed[agent_id] if ts >= cutoff]
                for offset, ts in part.unclaimed[agent_id]:
                    if ts < cutoff:
                        part.state.settle(offset)
                        released += 1
                if kept:
                    part.unclaimed[agent_id] = kept
                else:
                    del part.unclaimed[agent_id]
            if released:
                logger.warning(
                    "inbox partition %d: released %d records whose agents did not open an inbox here within "
                    "inbox_unclaimed_ms=%d (not delivered to an inbox; other groups still read them)",
                    part.state.tp.partition, released, self._settings.inbox_unclaimed_ms)
                self._commit_wanted.set()

    async def _commit_now(self, parts: list[_Part]) -> bool:
        consumer = self._consumer
        if consumer is None:
            return True
        return await commit_floors(consumer, [p.state for p in parts], "inbox commit")

    async def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        parts = [p for p in (self._parts.pop(tp.partition, None) for tp in revoked) if p is not None]
        if not parts:
            return
        for part in parts:
            part.revoked = True
        for agent in self._agents.values():
            kept = deque(item for item in agent.queue if not item[0].revoked)
            self._take_buffered(len(agent.queue) - len(kept))
            agent.queue = kept
        # A short grace for acks in progress, not ack_wait: an agent may hold a delivery for minutes
        # (or not iterate yet), and the whole group waits for this member. What is still unsettled
        # after it is read again by the next owner (a duplicate, not a loss).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.heartbeat_interval_ms / 1000
        while any(p.inflight for p in parts) and loop.time() < deadline:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await self._progress.wait()
        await self._commit_now(parts)

    def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        for tp in assigned:
            if tp.topic == self._topic and tp.partition not in self._parts:
                self._parts[tp.partition] = _Part(tp)
        self._assigned.set()
