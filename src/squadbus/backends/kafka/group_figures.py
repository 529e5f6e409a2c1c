"""Consumer-group figures of the Kafka backend (``DescribesGroups``): committed offsets vs end offsets.

A squadbus group is the Kafka group ``durable_name(group, pattern)``. Its
``lag`` is the sum, over the partitions of the topics it reads, of the end
offset (:func:`.ends.high_watermarks`: tansu lists less than the real end)
minus the group's committed offset (the partition's first offset when the
group committed nothing there). A record is committed once it and every
record before it in its partition were settled, so the lag also counts
records in handlers or waiting for a retry: Kafka keeps no "delivered, not
acknowledged" state, and ``pending``, ``redeliveries`` and ``dead_letters``
(all groups share one DLQ topic) are ``None``.

Groups with a member in this process are described by their pattern (the
topics :meth:`TopicLayout.topics_for` it reads). Other processes' groups are
found with ListGroups and described by the layout topics they committed on;
one that committed nothing on them is not listed (what it reads is unknown).
Cost: a short-lived admin client and groupless consumer, ListGroups, one
OffsetFetch per group, two ListOffsets and a one-record fetch per non-empty
partition (see :mod:`.ends`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from squadbus.backends.kafka._driver import AIOKafkaAdminClient, KafkaError, TopicPartition
from squadbus.backends.kafka.ends import groupless_consumer, high_watermarks
from squadbus.backends.kafka.producer import translate
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout
from squadbus.core.backend import GroupFigures, group_of


async def group_figures(
    settings: KafkaSettings, layout: TopicLayout, *, local: Mapping[str, tuple[str, str]] | None = None
) -> list[GroupFigures]:
    """One :class:`GroupFigures` per squadbus group on the broker.

    ``local`` maps the Kafka group ids of this process's subscriptions to
    their ``(group, pattern)``. Bounded by ``connect_timeout``; raises a
    BackendError when the broker does not answer.
    """
    local = local or {}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=list(settings.bootstrap_servers), client_id=settings.client_id,
        request_timeout_ms=int(settings.connect_timeout * 1000),
    )
    consumer = groupless_consumer(settings)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await admin.start()
            await consumer.start()
            await consumer.topics()  # refresh metadata
            tps = [TopicPartition(topic, p) for topic in layout.all
                   for p in sorted(consumer.partitions_for_topic(topic) or ())]
            listed = await admin.list_consumer_groups()
            ids = sorted({gid for gid, _ in listed if group_of(gid) is not None} | set(local))
            offsets = await asyncio.gather(*(admin.list_consumer_group_offsets(gid, partitions=tps) for gid in ids))
            beginnings = await consumer.beginning_offsets(tps) if tps else {}
            ends = await high_watermarks(consumer, tps, beginnings=beginnings)
    except (KafkaError, TimeoutError) as exc:
        raise translate(exc, "describe the consumer groups") from exc
    finally:
        await consumer.stop()
        await admin.close()
    out = []
    for gid, committed_by_tp in zip(ids, offsets, strict=True):
        committed = {tp: meta.offset for tp, meta in committed_by_tp.items() if meta.offset >= 0}
        if gid in local:
            group, pattern = local[gid]
            topics = set(layout.topics_for(pattern))
            subject = pattern
        else:
            topics = {tp.topic for tp in committed}
            if not topics:
                continue
            group, subject = group_of(gid) or gid, ",".join(sorted(topics))
        lag = sum(max(0, ends[tp] - committed.get(tp, beginnings[tp])) for tp in tps if tp.topic in topics)
        out.append(GroupFigures(group=group, subject=subject, lag=lag, pending=None))
    return out
