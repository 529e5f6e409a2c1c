"""Replay of one execution from the broker.

An execution's messages share one key (its ``task_execution_id``), so they
sit in one partition of the main topic, found with the same partitioner the
producer uses. A consumer without a group reads that partition from an
offset (``from_seq``) or from the first offset whose timestamp is at or
after ``since`` (``offsets_for_times``; a record's timestamp is taken when
it is sent, after the message's ``created_at``, so no message is missed),
up to the partition's end as of the start of the replay (its real end,
:mod:`.ends`: tansu lists less after a batched publish). Positions are Kafka
offsets in that partition. An offset a fetch skipped is read again
(:class:`.partition.GapGuard`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from uuid import UUID

from squadbus.backends.kafka._driver import KafkaError, TopicPartition
from squadbus.backends.kafka.ends import groupless_consumer, high_watermarks
from squadbus.backends.kafka.partition import GAP_RETRY_DELAY, GapGuard
from squadbus.backends.kafka.partitioner import partition_for
from squadbus.backends.kafka.producer import translate
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import MalformedMessage

_READ_MS = 1000


def partition_of(key: bytes, partitions: list[int]) -> int:
    """The partition the producer's partitioner picks for ``key``."""
    return partition_for(key, sorted(partitions))


async def replay_execution(
    settings: KafkaSettings, topic: str, partitions: list[int], task_execution_id: UUID,
    *, from_seq: int = 0, since: datetime | None = None,
) -> AsyncIterator[tuple[int, Message]]:
    """Yield ``(offset, message)`` of ``task_execution_id`` in ``topic``; see the module docstring."""
    key = str(task_execution_id).encode()
    tp = TopicPartition(topic, partition_of(key, partitions))
    consumer = groupless_consumer(settings)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await consumer.start()
            first = await consumer.beginning_offsets([tp])
            end = (await high_watermarks(consumer, [tp], beginnings=first))[tp]
            start = max(from_seq, first[tp])
            if since is not None:
                found = (await consumer.offsets_for_times({tp: int(since.timestamp() * 1000)}))[tp]
                start = end if found is None else max(start, found.offset)
        if start >= end:
            return
        consumer.seek(tp, start)
        position = start
        guard, clock = GapGuard(tp), asyncio.get_running_loop().time
        while position < end:
            batch = await consumer.getmany(tp, timeout_ms=_READ_MS, max_records=500)
            records, missing = guard.take(batch.get(tp, ()), position, clock())
            if missing is not None:  # the fetch skipped an offset (partition.py): read again from it
                consumer.seek(tp, missing)
                await asyncio.sleep(GAP_RETRY_DELAY)
            for record in records:
                position = record.offset + 1
                if record.offset >= end:
                    return
                if record.key != key or record.value is None:
                    continue
                try:
                    message = decode(record.value)
                except MalformedMessage:
                    continue  # consumers dead-letter it; replay skips what it cannot read
                if message.task_execution_id != task_execution_id:
                    continue
                if since is not None and message.created_at < since:
                    continue
                yield record.offset, message
            if not batch:
                position = await consumer.position(tp)
    except (KafkaError, TimeoutError) as exc:
        raise translate(exc, f"replay of {task_execution_id}") from exc
    finally:
        await consumer.stop()
