"""Which partition a record goes to: Kafka's own placement, with recent keys' hashes remembered.

The key is the ``task_execution_id`` (else the subject), hashed with murmur2
exactly as the Java client and aiokafka's default partitioner do, so other
Kafka tools agree on where an execution lives. aiokafka's murmur2 is pure
Python that works byte by byte (~5-10 µs for a 36-byte key, the largest single
cost of a send); :func:`murmur2` here computes the same hash a 32-bit word at a
time (~1.5 µs), and a squad sends many messages per execution and per agent, so
the hash of a key seen recently is looked up instead of computed again.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from functools import lru_cache

_POSITIVE = 0x7FFFFFFF
_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995


@lru_cache(maxsize=256)
def _words(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of ``data`` (seed 0x9747b28c, as ``Utils.murmur2`` in the Java client)."""
    length = len(data)
    h = _SEED ^ length
    whole = length >> 2
    if whole:
        for word in _words(whole).unpack_from(data):
            k = (word * _M) & _MASK
            h = ((h * _M) & _MASK) ^ (((k ^ (k >> 24)) * _M) & _MASK)
    tail = length & 3
    if tail:
        base = length - tail
        if tail == 3:
            h ^= data[base + 2] << 16
        if tail >= 2:
            h ^= data[base + 1] << 8
        h = ((h ^ data[base]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_for(key: bytes, all_partitions: Sequence[int]) -> int:
    """The partition of ``key`` among ``all_partitions`` (sorted ids), as every Kafka client places it."""
    value = murmur2(key) & _POSITIVE
    return all_partitions[value % len(all_partitions)]


class KeyPartitioner:
    """An aiokafka ``partitioner``: ``partitioner(key, all_partitions, available) -> partition``."""

    def __init__(self, remember: int = 65_536) -> None:
        if remember < 1:
            raise ValueError("remember must be at least 1")
        self._remember = remember
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: Sequence[int], available: Sequence[int] | None) -> int:
        if key is None:
            return random.choice(available or all_partitions)
        hashes = self._hashes
        value = hashes.get(key)
        if value is None:
            if len(hashes) >= self._remember:
                hashes.clear()  # a bounded memory; a cleared entry only costs one more hash
            value = hashes[key] = murmur2(key) & _POSITIVE
        return all_partitions[value % len(all_partitions)]
