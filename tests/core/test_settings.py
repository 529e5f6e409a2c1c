"""Settings from the environment: SQUADBUS_URL, the guide's MESSAGE_BUS, and bad values."""

from __future__ import annotations

import dataclasses
import enum

import pytest

from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.core.registry import open_backend
from squadbus.core.settings import Settings, url_options


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.url == "memory://"
    assert s.store_url.startswith("sqlite+aiosqlite://")
    assert s.max_content_bytes == 1024 * 1024


@pytest.mark.parametrize(("kind", "url"), [("memory", "memory://"), ("redis", "redis://127.0.0.1:6379/0"),
                                           ("nats", "nats://127.0.0.1:4222"), ("KAFKA", "kafka://127.0.0.1:9092")])
def test_message_bus_maps_to_a_default_url(kind: str, url: str) -> None:
    assert Settings.from_env({"MESSAGE_BUS": kind}).url == url


def test_squadbus_url_wins_over_message_bus() -> None:
    s = Settings.from_env({"MESSAGE_BUS": "redis", "SQUADBUS_URL": "nats://10.0.0.1:4222"})
    assert s.url == "nats://10.0.0.1:4222"


@pytest.mark.parametrize("env", [{"MESSAGE_BUS": "rabbit"}, {"SQUADBUS_MAX_CONTENT_BYTES": "big"},
                                 {"SQUADBUS_URL": "no-scheme"}, {"SQUADBUS_MAX_CONTENT_BYTES": "0"}])
def test_bad_values_raise_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        Settings.from_env(env)


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backend scheme"):
        open_backend("carrier-pigeon://coop")


async def test_bus_from_settings_applies_the_size_limit() -> None:
    settings = Settings.from_env({"SQUADBUS_MAX_CONTENT_BYTES": "10"})
    async with Bus.from_settings(settings) as bus:
        assert bus.max_content_bytes == 10



class _Mode(enum.Enum):
    FAST = "fast"
    DURABLE = "durable"


@dataclasses.dataclass
class _Options:
    count: int = 1
    ratio: float = 0.5
    on: bool = False
    mode: _Mode = _Mode.FAST
    path: str | None = None


def test_url_options_convert_by_field_type() -> None:
    names = [f.name for f in dataclasses.fields(_Options)]
    got = url_options(_Options, "count=3&count=4&ratio=2&on=YES&mode=Durable&path=/x", scheme="demo", names=names)
    assert got == {"count": 4, "ratio": 2.0, "on": True, "mode": _Mode.DURABLE, "path": "/x"}
    assert url_options(_Options, "on=off&on=0", scheme="demo", names=names) == {"on": False}
    assert url_options(_Options, "", scheme="demo", names=names) == {}
    for query, message in (("count=x", "bad demo:// option count='x'"), ("on=maybe", "bad demo:// option on="),
                           ("mode=slow", "bad demo:// option mode="), ("nope=1", "unknown demo:// option 'nope'")):
        with pytest.raises(ConfigError, match=message):
            url_options(_Options, query, scheme="demo", names=names)
