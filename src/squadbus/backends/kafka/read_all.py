"""Everything retained, once (``ReadsAll``): one consumer without a group on every partition.

The consumer is assigned every partition of the topics the pattern can match; their real ends
are noted first (:func:`.ends.high_watermarks`, the snapshot: tansu lists less after a batched
publish), then each partition is read from its beginning (or from ``offsets_for_times(since)``
less a clock slack) up to that end, and paused there. No group, no commit: nothing stays on the
broker. An offset a fetch skipped is read again (:class:`.partition.GapGuard`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from datetime import datetime, timedelta

from squadbus.backends.kafka._driver import AIOKafkaConsumer, KafkaError, TopicPartition
from squadbus.backends.kafka.ends import groupless_consumer, high_watermarks
from squadbus.backends.kafka.partition import GAP_RETRY_DELAY, GapGuard
from squadbus.backends.kafka.producer import translate
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout
from squadbus.core.backend import read_back
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout

_PAGE = 1000
_POLL_MS = 1000
_STALL = 15.0  # seconds without a record while short of the snapshot's end before giving up
_CLOCK_SLACK = timedelta(seconds=60)  # record timestamps and created_at come from different clocks


async def read_all(
    settings: KafkaSettings, layout: TopicLayout, pattern: str, *, since: datetime | None = None,
    on_unreadable: Callable[[bytes], None] | None = None,
) -> AsyncGenerator[Message, None]:
    """Yield every message of the topics ``pattern`` can match; see the module docstring."""
    consumer = groupless_consumer(settings)
    try:
        left, expected = await _start(consumer, settings, layout.topics_for(pattern), since)
        guards = {tp: GapGuard(tp) for tp in left}
        clock = asyncio.get_running_loop().time
        idle = 0.0
        while left:
            batch = await consumer.getmany(*left, timeout_ms=_POLL_MS, max_records=_PAGE)
            idle = 0.0 if batch else idle + _POLL_MS / 1000
            if idle >= _STALL:
                raise BackendTimeout(f"kafka: no record for {_STALL:g} s while short of the end offsets "
                                     f"{ {str(tp): end for tp, end in left.items()} }")
            again = False
            for tp, fetched in batch.items():
                records, missing = guards[tp].take(fetched, expected[tp], clock())
                if missing is not None:  # the fetch skipped an offset (partition.py): read again from it
                    consumer.seek(tp, missing)
                    again = True
                for record in records:
                    if record.offset >= left.get(tp, 0):
                        break
                    expected[tp] = record.offset + 1
                    message = read_back(record.value or b"", pattern, since, on_unreadable)
                    if message is not None:
                        yield message
            if again:
                await asyncio.sleep(GAP_RETRY_DELAY)
                continue
            for tp in list(left):
                if await consumer.position(tp) >= left[tp]:
                    consumer.pause(tp)
                    del left[tp]
    except KafkaError as exc:
        raise translate(exc, "read records") from exc
    finally:
        await consumer.stop()


async def _start(
    consumer: AIOKafkaConsumer, settings: KafkaSettings, topics: list[str], since: datetime | None
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """Connect, note the ends, seek to the starts; the partitions with something to read with their ends,
    and their starts."""
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await consumer.start()
            known = await consumer.topics()
            tps = [TopicPartition(t, p) for t in topics if t in known
                   for p in sorted(consumer.partitions_for_topic(t) or ())]
            if not tps:
                return {}, {}
            starts = await consumer.beginning_offsets(tps)
            ends = await high_watermarks(consumer, tps, beginnings=starts)
            if since is not None:
                stamp = int((since - _CLOCK_SLACK).timestamp() * 1000)
                found = await consumer.offsets_for_times(dict.fromkeys(tps, stamp))
                starts = {tp: ends[tp] if found[tp] is None else max(starts[tp], found[tp].offset) for tp in tps}
    except (KafkaError, TimeoutError) as exc:
        raise translate(exc, "read the end offsets") from exc
    for tp, start in starts.items():
        consumer.seek(tp, start)
    left = {tp: end for tp, end in ends.items() if starts[tp] < end}
    consumer.pause(*(tp for tp in tps if tp not in left))
    return left, {tp: starts[tp] for tp in left}
