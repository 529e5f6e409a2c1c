"""Settings: the only place squadbus reads the environment.

``Settings.from_env()`` reads:

* ``SQUADBUS_URL``: backend URL (``memory://``, ``redis://…``, ``nats://…``,
  ``kafka://…``, ``dual://<primary>|<secondary>``);
* ``MESSAGE_BUS``: the guide's switch, ``memory|redis|nats|kafka``, used when
  ``SQUADBUS_URL`` is unset, mapped to that backend's local default URL;
* ``SQUADBUS_STORE_URL``: history store (default ``sqlite+aiosqlite:///./squadbus.db``);
* ``SQUADBUS_MAX_CONTENT_BYTES``: content size limit (default 1 MiB);
* ``SQUADBUS_TOKENS_FILE``: bearer tokens for the HTTP service.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from squadbus.core.envelope import DEFAULT_MAX_CONTENT_BYTES
from squadbus.core.errors import ConfigError

DEFAULT_URL = "memory://"
DEFAULT_STORE_URL = "sqlite+aiosqlite:///./squadbus.db"

MESSAGE_BUS_URLS: Mapping[str, str] = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "kafka": "kafka://127.0.0.1:9092",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Process-wide settings, built once at start and passed down."""

    url: str = DEFAULT_URL
    store_url: str = DEFAULT_STORE_URL
    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES
    tokens_file: str | None = None

    def __post_init__(self) -> None:
        if "://" not in self.url:
            raise ConfigError(f"backend URL {self.url!r} has no scheme (expected e.g. memory://)")
        if self.max_content_bytes < 1:
            raise ConfigError("max_content_bytes must be positive")

    def with_url(self, url: str) -> Settings:
        """A copy with another backend URL."""
        return replace(self, url=url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); raises ConfigError on bad values."""
        env = os.environ if environ is None else environ
        url = env.get("SQUADBUS_URL")
        if not url:
            kind = env.get("MESSAGE_BUS", "memory").strip().lower()
            if kind not in MESSAGE_BUS_URLS:
                raise ConfigError(f"MESSAGE_BUS={kind!r}: expected one of {', '.join(MESSAGE_BUS_URLS)}")
            url = MESSAGE_BUS_URLS[kind]
        raw_limit = env.get("SQUADBUS_MAX_CONTENT_BYTES")
        try:
            limit = int(raw_limit) if raw_limit else DEFAULT_MAX_CONTENT_BYTES
        except ValueError as exc:
            raise ConfigError(f"SQUADBUS_MAX_CONTENT_BYTES={raw_limit!r} is not an integer") from exc
        return cls(
            url=url,
            store_url=env.get("SQUADBUS_STORE_URL") or DEFAULT_STORE_URL,
            max_content_bytes=limit,
            tokens_file=env.get("SQUADBUS_TOKENS_FILE") or None,
        )
