"""Redis Streams backend: ``redis://`` and ``rediss://`` (TLS) URLs.

>>> backend = from_url("redis://127.0.0.1:6379/0?profile=durable&partitions=8")

Needs redis-py (``pip install 'squadbus[redis]'``). The layout of streams and
groups, the profiles and what each can lose are in docs/backends/redis.md.
"""

from __future__ import annotations

from squadbus.backends.redis.backend import RedisBackend
from squadbus.backends.redis.settings import Profile, RedisSettings

__all__ = ["Profile", "RedisBackend", "RedisSettings", "from_url"]


def from_url(url: str) -> RedisBackend:
    """A RedisBackend (not connected) from ``redis[s]://[user:pass@]host[:port][/db][?options]``."""
    return RedisBackend(RedisSettings.from_url(url))
