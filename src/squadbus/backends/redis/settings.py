"""Settings of the Redis Streams backend, parsed from a ``redis://`` or ``rediss://`` URL."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from squadbus.core.errors import ConfigError


class Profile(enum.Enum):
    """How hard a publish tries to be durable before it returns.

    ``FAST``: a publish returns once Redis holds the entry in memory; whatever
    the server's persistence settings allow may be lost on a Redis crash
    (``appendfsync everysec``: about the last second; no AOF: everything since
    the last RDB snapshot).

    ``DURABLE``: a publish returns only once the entry is on disk. On Redis
    >= 7.2 every publish round trip ends with ``WAITAOF 1 0``; on older
    servers the backend requires ``appendonly yes`` and ``appendfsync
    always`` (checked at connect; a server configured otherwise is a
    ConfigError). Lost on a crash: nothing acknowledged, barring disk failure.
    """

    FAST = "fast"
    DURABLE = "durable"


def _opt_int(value: str) -> int | None:
    return None if value.lower() in ("", "none", "0") else int(value)


def _opt_float(value: str) -> float | None:
    return None if value.lower() in ("", "none", "0") else float(value)


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


_QUERY_OPTIONS: dict[str, Any] = {
    "profile": Profile,
    "partitions": int,
    "prefix": str,
    "maxlen": _opt_int,
    "subject_maxlen": _opt_int,
    "max_age": _opt_float,
    "trim_interval": float,
    "dedupe_window": float,
    "reply_ttl": float,
    "publish_timeout": float,
    "connect_timeout": float,
    "publish_batch": int,
    "block": float,
    "claim_interval": _opt_float,
    "ordered_groups": _bool,
    "group_lease": float,
    "tls_ca_certs": str,
    "tls_verify": _bool,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class RedisSettings:
    """Everything the Redis backend needs; build it with :meth:`from_url`.

    Connection: ``host``, ``port``, ``db``, ``username``, ``password``,
    ``tls`` (``rediss://``), ``tls_ca_certs``, ``tls_verify``.

    Layout (see docs/backends/redis.md): ``prefix`` of every key,
    ``partitions`` partition streams.

    Retention: ``maxlen`` entries per partition stream, ``subject_maxlen``
    per subject stream, ``max_age`` seconds for both (None = unbounded);
    applied every ``trim_interval`` seconds by the trimmer, which reports
    every entry it trims that a group had not acknowledged.

    Publishing: ``dedupe_window`` seconds an id is remembered (0 = no
    dedupe), ``publish_timeout`` seconds before a publish raises,
    ``publish_batch`` messages at most per round trip, ``reply_ttl`` seconds
    a request's reply stream lives.

    Consuming: ``block`` seconds one XREADGROUP waits; ``claim_interval``
    seconds between XAUTOCLAIM passes (None = ``min(ack_wait / 2, 5)``);
    ``ordered_groups``: each stream a group reads (a partition) is served by
    one member at a time, under a lease, so order per execution holds across
    the members of a group and across a member's death (``leases.py``);
    False lets every member read every stream (competing consumers per
    entry, order kept only within one member); ``group_lease`` seconds a
    partition lease lasts without renewal (capped by the group's
    ``ack_wait``): how long the partitions of a member that died, or of a
    process restarted after a crash, wait before another member (or the
    restarted one) takes them over, and how long a stalled member may
    stall before it loses them.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca_certs: str | None = None
    tls_verify: bool = True
    profile: Profile = Profile.FAST
    prefix: str = "squadbus"
    partitions: int = 8
    maxlen: int | None = None
    subject_maxlen: int | None = None
    max_age: float | None = None
    trim_interval: float = 5.0
    dedupe_window: float = 120.0
    reply_ttl: float = 300.0
    publish_timeout: float = 10.0
    connect_timeout: float = 5.0
    publish_batch: int = 256
    block: float = 2.0
    claim_interval: float | None = None
    ordered_groups: bool = True
    group_lease: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= 4096:
            raise ConfigError("partitions must be between 1 and 4096")
        if not self.prefix or any(c in self.prefix for c in " \t\r\n"):
            raise ConfigError("prefix must be a non-empty string without whitespace")
        for name in ("maxlen", "subject_maxlen"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive or None")
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigError("max_age must be positive or None")
        if self.dedupe_window < 0:
            raise ConfigError("dedupe_window must be >= 0")
        for name in ("trim_interval", "reply_ttl", "publish_timeout", "connect_timeout", "block", "group_lease"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.claim_interval is not None and self.claim_interval <= 0:
            raise ConfigError("claim_interval must be positive or None")
        if self.publish_batch < 1:
            raise ConfigError("publish_batch must be at least 1")
        if self.db < 0:
            raise ConfigError("db must be >= 0")

    @property
    def retention(self) -> bool:
        """True when some retention limit is set (the trimmer runs)."""
        return self.maxlen is not None or self.subject_maxlen is not None or self.max_age is not None

    @classmethod
    def from_url(cls, url: str) -> RedisSettings:
        """Parse ``redis[s]://[user[:password]@]host[:port][/db][?option=value&...]``.

        Options are the field names of this class (``profile=durable``,
        ``partitions=8``, ``maxlen=100000``, ``max_age=86400``,
        ``dedupe_window=120``, ``publish_timeout=10``, ...). Unknown options
        are a ConfigError.
        """
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"bad redis URL {url!r}: {exc}") from exc
        if scheme not in ("redis", "rediss"):
            raise ConfigError(f"not a redis:// or rediss:// URL: {url!r}")
        values: dict[str, Any] = {"tls": scheme == "rediss", "host": parts.hostname or "127.0.0.1"}
        if port is not None:
            values["port"] = port
        if parts.username:
            values["username"] = unquote(parts.username)
        if parts.password:
            values["password"] = unquote(parts.password)
        path = parts.path.strip("/")
        if path:
            try:
                values["db"] = int(path)
            except ValueError as exc:
                raise ConfigError(f"redis URL path must be a database number, got {path!r}") from exc
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - set(_QUERY_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown redis:// option(s): {', '.join(sorted(unknown))}")
        try:
            for key, raw in query.items():
                values[key] = _QUERY_OPTIONS[key](raw)
        except ValueError as exc:
            raise ConfigError(f"bad redis:// option in {url!r}: {exc}") from exc
        return cls(**values)

    def redacted(self) -> str:
        """The server's URL for logs and errors, the password replaced by ``***``."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}:***@" if self.username else (":***@" if self.password else "")
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}"
