"""The one place the Kafka backend imports aiokafka (an optional dependency)."""

from __future__ import annotations

try:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata
    from aiokafka.errors import (
        CommitFailedError,
        IllegalStateError,
        KafkaConnectionError,
        KafkaError,
        KafkaTimeoutError,
        NoBrokersAvailable,
        NodeNotReadyError,
        RequestTimedOutError,
    )
    from aiokafka.partitioner import DefaultPartitioner, murmur2
    from aiokafka.protocol.metadata import MetadataRequest
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the kafka:// backend needs aiokafka: pip install squadbus[kafka]") from exc

__all__ = [
    "AIOKafkaAdminClient",
    "AIOKafkaConsumer",
    "AIOKafkaProducer",
    "CommitFailedError",
    "ConsumerProtocolMemberAssignment",
    "ConsumerProtocolMemberMetadata",
    "ConsumerRebalanceListener",
    "ConsumerRecord",
    "DefaultPartitioner",
    "IllegalStateError",
    "KafkaConnectionError",
    "KafkaError",
    "KafkaTimeoutError",
    "MetadataRequest",
    "NewTopic",
    "NoBrokersAvailable",
    "NodeNotReadyError",
    "RequestTimedOutError",
    "TopicPartition",
    "murmur2",
]
