"""NatsSettings.from_url parsing and validation (no server needed)."""

from __future__ import annotations

import pytest

from squadbus.backends.nats import NatsSettings, Profile, from_url
from squadbus.core.errors import ConfigError
from squadbus.core.registry import open_backend


def test_defaults_and_options() -> None:
    s = NatsSettings.from_url(
        "nats://127.0.0.1:4222,127.0.0.1:4223?profile=fast&replicas=3&dedupe_window=60&stream=s1&max_age=3600"
    )
    assert s.servers == ("nats://127.0.0.1:4222", "nats://127.0.0.1:4223")
    assert s.profile is Profile.FAST
    assert (s.replicas, s.dedupe_window, s.stream, s.max_age) == (3, 60.0, "s1", 3600.0)
    assert NatsSettings.from_url("nats://localhost").servers == ("nats://localhost:4222",)


def test_credentials_and_tls() -> None:
    s = NatsSettings.from_url("tls://alice:s%40cret@h1:4222,h2:4222")
    assert (s.user, s.password, s.tls) == ("alice", "s@cret", True)
    assert s.servers == ("tls://h1:4222", "tls://h2:4222")
    assert "alice" not in s.redacted()
    assert NatsSettings.from_url("nats://tok@h1:4222").token == "tok"


@pytest.mark.parametrize("url", [
    "redis://h:1", "nats://h:1?nope=1", "nats://h:1?replicas=2", "nats://h:1?profile=turbo",
    "nats://h:1?stream=a.b", "nats://h:1?dedupe_window=x", "nats://h:1?tls_cert=/c",
])
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        NatsSettings.from_url(url)


def test_registry_builds_the_backend() -> None:
    assert open_backend("nats://127.0.0.1:1").name == "nats"
    assert from_url("tls://127.0.0.1:1").settings.tls
