"""The real end of Kafka partitions: one helper for every "read up to / start at the end".

ListOffsets(latest) (aiokafka's ``end_offsets``, ``seek_to_end``, ``auto_offset_reset="latest"``)
is the high watermark on Kafka, but tansu 0.6 answers it with the base offset of the partition's
*last record batch* + 1: after a ``publish_many`` of 1,000 records over 4 partitions it listed
123 for a partition ending at 154, and 1 for a partition written in one batch. A fetch response
carries the real high watermark on both. So :func:`high_watermarks` lists the ends, then fetches
one record at the last listed offset - 1 of every non-empty partition: that record exists, so the
broker answers at once (no ``fetch_max_wait_ms`` wait on Kafka), and the response's high
watermark is the end. A partition whose listed end is its beginning is empty (tansu lists at
least 1 once it holds a batch) and needs no fetch. Cost on Kafka: two ListOffsets and one fetch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from squadbus.backends.kafka._driver import AIOKafkaConsumer, TopicPartition
from squadbus.backends.kafka.settings import KafkaSettings

_PROBE_MS = 200


async def high_watermarks(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition],
    *, beginnings: Mapping[TopicPartition, int] | None = None,
) -> dict[TopicPartition, int]:
    """The end offset (next offset to be written) of each of ``tps`` now.

    ``consumer`` is a started consumer without a group; this assigns it exactly ``tps`` and moves
    their positions, so seek before reading. ``beginnings`` saves a round trip when the caller
    already has them. Raises KafkaError; the caller bounds it with a timeout.
    """
    consumer.assign(list(tps))  # fresh partition states: no high watermark from an earlier fetch
    if not tps:
        return {}
    listed = await consumer.end_offsets(list(tps))
    if beginnings is None:
        beginnings = await consumer.beginning_offsets(list(tps))
    probe = [tp for tp in tps if listed[tp] > beginnings[tp]]
    for tp in probe:
        consumer.seek(tp, listed[tp] - 1)
    while any(consumer.highwater(tp) is None for tp in probe):
        await consumer.getmany(*probe, timeout_ms=_PROBE_MS, max_records=1)
    return {tp: max(listed[tp], consumer.highwater(tp) or 0) if tp in probe else listed[tp] for tp in tps}


def groupless_consumer(settings: KafkaSettings) -> AIOKafkaConsumer:
    """A consumer without a group (assigned partitions, no commits): replay, read_all, end probes."""
    return AIOKafkaConsumer(
        bootstrap_servers=list(settings.bootstrap_servers), client_id=settings.client_id,
        group_id=None, enable_auto_commit=False, fetch_max_wait_ms=settings.fetch_max_wait_ms,
    )


async def high_watermarks_now(settings: KafkaSettings, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
    """:func:`high_watermarks` through a short-lived consumer without a group (for a group's consumer,
    which cannot fetch before it joins). Bounded by ``connect_timeout``; raises KafkaError or TimeoutError."""
    if not tps:
        return {}
    consumer = groupless_consumer(settings)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await consumer.start()
            return await high_watermarks(consumer, tps)
    finally:
        await consumer.stop()
