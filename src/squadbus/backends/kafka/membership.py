"""A Kafka subscription's group membership: joining, the rebalance listener, commits.

:class:`GroupMembership` is the part of :class:`~squadbus.backends.kafka.source.KafkaSubscription`
that deals with its consumer group: waiting for the first assignment, a
consumer without a group positioned at the end, partitions revoked (wait up
to ``ack_wait`` for the records in flight, then commit) and assigned (a new
group starts at the end as of ``subscribe()``), and the coalesced commits of
the partitions' floors (:mod:`.partition`). It holds no state of its own: the
attributes it uses are the subscription's, set in its ``__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from squadbus.backends.kafka._driver import (
    AIOKafkaConsumer,
    ConsumerRebalanceListener,
    KafkaError,
    TopicPartition,
)
from squadbus.backends.kafka.ends import high_watermarks, high_watermarks_now
from squadbus.backends.kafka.partition import PartitionState, commit_floors
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core.backend import ConsumerOptions, StartFrom, durable_name

logger = logging.getLogger("squadbus.backends.kafka")


def _leave_even_from_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """Make ``consumer.stop()`` send LeaveGroup even in generation 0.

    tansu numbers a group's first generation 0 and aiokafka only leaves from
    generation > 0, so without this a closed member keeps its partitions until
    its session times out and the next member waits that long. Uses aiokafka
    internals; if they change, the close is just slower.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    original = getattr(coordinator, "_maybe_leave_group", None)
    if coordinator is None or original is None or not hasattr(coordinator, "generation"):
        return

    async def leave() -> None:
        if coordinator.generation == 0 and getattr(coordinator, "member_id", ""):
            coordinator.generation = 1  # LeaveGroup carries no generation; this only passes aiokafka's check
        await original()

    coordinator._maybe_leave_group = leave


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sub: GroupMembership) -> None:
        self._sub = sub

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._sub._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._sub._on_assigned(assigned)


class GroupMembership:
    """Joining, rebalances and commits of one :class:`~squadbus.backends.kafka.source.KafkaSubscription`
    (its base class; the attributes below are set by the subscription)."""

    _settings: KafkaSettings
    _options: ConsumerOptions
    _pattern: str
    _group: str | None
    _topics: list[str]
    _consumer: AIOKafkaConsumer | None
    _parts: dict[TopicPartition, PartitionState]
    _order: list[PartitionState]
    _cursor: int
    _last: PartitionState | None
    _buffered: int
    _snapshot: dict[TopicPartition, int]
    _joined: asyncio.Event
    _space: asyncio.Event
    _commit_wanted: asyncio.Event
    _progress: asyncio.Event
    _revoking: int
    _closing: bool

    def _notify(self) -> None:
        """Wake the consumer waiting for records (the subscription's)."""
        raise NotImplementedError

    @property
    def kafka_group_id(self) -> str | None:
        """The Kafka consumer group id, ``durable_name(group, pattern)``."""
        return durable_name(self._group, self._pattern) if self._group is not None else None

    # ---- joining ------------------------------------------------------------------------------

    async def _wait_joined(self) -> None:
        """Return once the group has given this member its first assignment (possibly no partition), or
        after ``join_timeout`` with a warning: the member keeps trying and consumes once it joins."""
        try:
            async with asyncio.timeout(self._settings.join_timeout):
                await self._joined.wait()
        except TimeoutError:
            logger.warning("group %s has not assigned partitions within %.0f s; subscribe() returns, "
                           "deliveries start once it does", self.kafka_group_id, self._settings.join_timeout)

    async def _all_partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        await consumer.topics()  # refresh metadata
        return [
            TopicPartition(topic, p)
            for topic in self._topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]

    async def _assign_at_end(self, consumer: AIOKafkaConsumer) -> None:
        tps = await self._all_partitions(consumer)
        ends = await high_watermarks(consumer, tps)  # not seek_to_end: tansu lists less (see .ends)
        for tp in tps:
            consumer.seek(tp, ends[tp])  # fixed now: what is published after subscribe() returns is seen
            self._parts[tp] = PartitionState(tp)
        self._order = list(self._parts.values())

    # ---- commits and rebalances --------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if not await self._commit_now():
                await asyncio.sleep(0.2)
                self._commit_wanted.set()
            await asyncio.sleep(self._settings.commit_interval_ms / 1000)  # what settles meanwhile: one commit

    async def _commit_now(self, parts: Iterable[PartitionState] | None = None) -> bool:
        """Commit the floors that moved; False when a retry makes sense."""
        consumer = self._consumer
        assert consumer is not None
        return await commit_floors(consumer, self._parts.values() if parts is None else parts,
                                   f"commit for {self.kafka_group_id}")

    def _reorder(self) -> None:
        self._order = list(self._parts.values())
        self._cursor = 0
        self._last = None

    async def _on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        parts = [p for p in (self._parts.pop(tp, None) for tp in revoked) if p is not None]
        self._reorder()
        for part in parts:
            part.revoked = True  # hands out nothing more; its settles wait for no commit of their own
            self._buffered -= len(part.queue)
            part.queue.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.ack_wait
        self._revoking += 1
        try:
            while any(p.inflight for p in parts) and loop.time() < deadline:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await self._progress.wait()
        finally:
            self._revoking -= 1
        if parts:
            await self._commit_now(parts)
        self._space.set()

    async def _on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        try:
            await self._take_partitions(assigned)
        finally:
            self._joined.set()

    async def _take_partitions(self, assigned: Iterable[TopicPartition]) -> None:
        consumer = self._consumer
        assert consumer is not None
        fresh = [tp for tp in assigned if tp not in self._parts]
        for tp in fresh:
            self._parts[tp] = PartitionState(tp)
        self._reorder()
        if self._options.start is StartFrom.NEW and fresh and not self._closing:
            consumer.pause(*fresh)
            try:
                await self._start_new_partitions(consumer, fresh)
            except KafkaError as exc:
                logger.warning("positioning new group %s failed; using the end: %s", self.kafka_group_id, exc)
            finally:
                consumer.resume(*fresh)
        self._notify()

    async def _start_new_partitions(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Start partitions the group never committed at the end *as of subscribe()*, and commit that.

        ``auto_offset_reset="latest"`` alone would resolve "the end" when the
        join completes, skipping what was published between ``subscribe``
        returning and the join; committing fixes the start for later members.
        """
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        starts: dict[TopicPartition, int] = {}
        for tp, offset in zip(tps, committed, strict=True):
            if offset is not None:
                continue
            start = self._snapshot.get(tp)
            if start is None:
                try:
                    start = (await high_watermarks_now(self._settings, [tp]))[tp]
                except TimeoutError as exc:
                    raise KafkaError(f"no end offset of {tp} within {self._settings.connect_timeout:g} s") from exc
            consumer.seek(tp, start)
            starts[tp] = start
        if starts:
            await consumer.commit(starts)
            for tp, start in starts.items():
                part = self._parts.get(tp)
                if part is not None:
                    part.committed = part.floor = start
