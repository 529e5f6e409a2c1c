"""RedisSettings.from_url parsing and validation (no server needed)."""

from __future__ import annotations

import pytest

from squadbus.backends.redis import Profile, RedisSettings, from_url
from squadbus.core.errors import ConfigError
from squadbus.core.registry import open_backend


def test_full_url() -> None:
    s = RedisSettings.from_url("rediss://alice:s%40cret@redis.example:6380/3?profile=durable&partitions=16"
                               "&maxlen=1000&max_age=3600&dedupe_window=0&publish_timeout=2.5&tls_verify=false")
    assert (s.host, s.port, s.db, s.username, s.password) == ("redis.example", 6380, 3, "alice", "s@cret")
    assert s.tls and not s.tls_verify
    assert s.profile is Profile.DURABLE
    assert (s.partitions, s.maxlen, s.max_age, s.dedupe_window, s.publish_timeout) == (16, 1000, 3600.0, 0.0, 2.5)
    assert "s@cret" not in s.redacted()


def test_defaults() -> None:
    s = RedisSettings.from_url("redis://")
    assert (s.host, s.port, s.db, s.tls, s.profile) == ("127.0.0.1", 6379, 0, False, Profile.FAST)
    assert not s.retention


@pytest.mark.parametrize("url", [
    "redis://h/notanumber", "redis://h?bogus=1", "redis://h?partitions=0", "redis://h?profile=safe",
    "nats://h", "redis://h?maxlen=-5", "redis://h?publish_timeout=abc",
])
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisSettings.from_url(url)


def test_registry_maps_both_schemes() -> None:
    assert open_backend("redis://h:1/0").name == "redis"
    assert from_url("rediss://h").settings.tls
