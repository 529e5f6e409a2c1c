"""Settings of the memory backend (``memory://?retain_messages=N&dedupe_window=N&publish_timeout=S``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from squadbus.core.errors import ConfigError


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySettings:
    """Settings of the memory backend; ``from_url("memory://?retain_messages=1000")``.

    ``retain_messages`` bounds the replay window (``stats()`` reports what
    left it). It is memory *and* time: every retained message keeps a
    GC-tracked UUID alive, so full collections grow with the window (measured:
    ~10% of send throughput at 100,000). History belongs to the store.
    """

    retain_messages: int = 10_000
    dedupe_window: int = 100_000
    publish_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.retain_messages < 0 or self.dedupe_window < 0:
            raise ConfigError("retain_messages and dedupe_window must be >= 0")
        if self.publish_timeout <= 0:
            raise ConfigError("publish_timeout must be positive")

    @classmethod
    def from_url(cls, url: str) -> MemorySettings:
        """Parse ``memory://?retain_messages=N&dedupe_window=N&publish_timeout=S``."""
        parts = urlsplit(url)
        if parts.scheme != "memory":
            raise ConfigError(f"not a memory:// URL: {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {"retain_messages": int, "dedupe_window": int, "publish_timeout": float}
        unknown = set(query) - set(known)
        if unknown:
            raise ConfigError(f"unknown memory:// option(s): {', '.join(sorted(unknown))}")
        try:
            values: dict[str, Any] = {k: known[k](v) for k, v in query.items()}
        except ValueError as exc:
            raise ConfigError(f"bad memory:// option in {url!r}: {exc}") from exc
        return cls(**values)
