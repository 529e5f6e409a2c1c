"""The ``kafka://`` backend: Apache Kafka (or a Kafka-protocol broker such as tansu) over aiokafka.

``kafka://host:9092[,host2:9092][?partitions=8&idempotence=auto&...]``; the
options are the fields of :class:`KafkaSettings`. Needs
``pip install squadbus[kafka]``. Topic layout, guarantees and what was
tested on tansu versus Apache Kafka: docs/backends/kafka.md.

Package layout: :mod:`.settings` (URL and options), :mod:`.topics`
(subject-to-topic mapping, topic creation), :mod:`.producer` (publishing),
:mod:`.consumer` (a subscription: core's consumer runtime), :mod:`.source` (its
source of deliveries), :mod:`.membership` (group joins, rebalances, commits) and
:mod:`.partition` (per-partition bookkeeping, retries),
:mod:`.deadletter` (records that are not envelopes), :mod:`.ends` (the real end
of partitions), :mod:`.replay`, :mod:`.read_all` (everything retained, once).
"""

from __future__ import annotations

from squadbus.backends.kafka.backend import KafkaBackend
from squadbus.backends.kafka.consumer import KafkaConsumer, KafkaDelivery, KafkaSubscription
from squadbus.backends.kafka.settings import Idempotence, KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout

__all__ = [
    "Idempotence", "KafkaBackend", "KafkaConsumer", "KafkaDelivery", "KafkaSettings", "KafkaSubscription",
    "TopicLayout", "from_url",
]


def from_url(url: str) -> KafkaBackend:
    """A KafkaBackend (not yet connected) from a ``kafka://`` URL."""
    return KafkaBackend(KafkaSettings.from_url(url))
