"""The producer's partitioner places keys exactly as aiokafka's default (Java's murmur2) does."""

from __future__ import annotations

import uuid

from aiokafka.partitioner import DefaultPartitioner

from squadbus.backends.kafka.partitioner import KeyPartitioner, partition_for


def test_same_placement_as_the_default_partitioner_cached_or_not() -> None:
    default = DefaultPartitioner()
    ours = KeyPartitioner(remember=8)
    partitions = list(range(12))
    keys = [str(uuid.uuid4()).encode() for _ in range(200)] + [b"agent.message.dev-1", b"", b"x" * 300]
    for key in keys + keys:  # the second pass hits the cache (or a cleared one)
        expected = default(key, partitions, partitions)
        assert ours(key, partitions, partitions) == expected
        assert partition_for(key, partitions) == expected


def test_no_key_picks_an_available_partition() -> None:
    ours = KeyPartitioner()
    assert {ours(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert ours(None, [0, 1, 2, 3], []) in {0, 1, 2, 3}
