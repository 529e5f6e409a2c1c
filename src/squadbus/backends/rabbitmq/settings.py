"""Settings of the RabbitMQ backend, parsed from an ``amqp://`` or ``amqps://`` URL.

``amqp://[user:pass@]host[:port][/vhost][?option=value&...]`` (the vhost is
the URL-encoded path, ``/`` when absent; ``%2F`` names the vhost ``/`` too).

Options (all optional): ``profile`` (``durable`` | ``fast``), ``namespace`` (prefix of
the exchange, the log stream and every queue: several squads can share a
vhost), ``log_max_age`` (s, retention of the log stream, 0 = unlimited),
``log_max_bytes`` (0 = unlimited), ``publish_timeout`` (s, total including
retries), ``connect_timeout`` (s), ``reconnect_interval`` (s between
attempts to reconnect after the connection was lost), ``dedupe_window`` (s, 0 = off) and
``dedupe_size`` (ids remembered by the in-process publish window),
``single_active_consumer`` (``true``: every group queue this URL declares hands its messages to one
member at a time, the others standing by: per-execution order across members, no shared work),
``tls_ca`` (path; ``amqps://`` turns TLS on with the system CAs), ``setup_timeout`` (s, default 120: how
long a process waits for another one that holds the squad's setup lock while it creates queues and copies
the log's backlog into them).

Inboxes (docs/design/inboxes.md, RabbitMQ): ``inbox_partitions`` (queues an agent's direct messages
are spread over by ``crc32(agent) % inbox_partitions``; every process of the squad must use the same
number), ``inbox_hosts`` / ``inbox_host`` (``inbox_hosts`` > 0: this Bus reads only the partitions
``p % inbox_hosts == inbox_host``, so a deployment places agents by partition), ``inbox_prefetch``
(unacknowledged messages the broker hands a Bus per partition), ``inbox_unclaimed`` (s: how long a
Bus keeps a message for an agent that is not open on it before it acks it undelivered, logged).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from squadbus.core.errors import ConfigError
from squadbus.core.settings import url_options


class Profile(enum.Enum):
    """What a publisher confirm means (see docs/backends/rabbitmq.md)."""

    DURABLE = "durable"
    """Persistent messages, quorum queues and a stream: a confirm comes once the log stream and every
    group queue the message was routed to have written it to disk (fsync) on a quorum of their
    replicas, so an acknowledged message survives a broker crash."""
    FAST = "fast"
    """Transient messages and classic group and inbox queues (no Raft log, no fsync before the
    confirm), the same stream log: a confirm means the broker routed the message and holds it in
    memory. A broker crash or restart loses what the group and inbox queues held (the log stream
    keeps its copy); attempts are counted by each consumer, not by the broker."""


_URL_OPTIONS = (
    "profile", "namespace", "log_max_age", "log_max_bytes", "publish_timeout", "connect_timeout",
    "reconnect_interval", "dedupe_window", "dedupe_size", "tls_ca", "single_active_consumer",
    "inbox_partitions", "inbox_hosts", "inbox_host", "inbox_prefetch", "inbox_unclaimed", "setup_timeout",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RabbitSettings:
    """How to reach RabbitMQ and name the squad's exchange, log and queues; ``RabbitSettings.from_url(url)``."""

    host: str = "127.0.0.1"
    port: int = 5672
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    tls: bool = False
    tls_ca: str | None = None
    profile: Profile = Profile.DURABLE
    namespace: str = "squadbus"
    log_max_age: float = 7 * 24 * 3600.0
    log_max_bytes: int = 0
    publish_timeout: float = 15.0
    connect_timeout: float = 5.0
    reconnect_interval: float = 1.0
    dedupe_window: float = 120.0
    dedupe_size: int = 100_000
    single_active_consumer: bool = False
    inbox_partitions: int = 16
    inbox_hosts: int = 0
    inbox_host: int = 0
    inbox_prefetch: int = 1000
    inbox_unclaimed: float = 3600.0
    setup_timeout: float = 120.0

    @property
    def classic_queues(self) -> bool:
        """True when group and inbox queues are classic queues (``profile=fast``), not quorum queues."""
        return self.profile is Profile.FAST

    def __post_init__(self) -> None:
        if not self.namespace or any(not (c.isalnum() or c in "-_") for c in self.namespace):
            raise ConfigError(f"namespace {self.namespace!r} may contain only letters, digits, '-' and '_'")
        if len(self.namespace) > 100:
            raise ConfigError("namespace is longer than 100 characters")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if min(self.publish_timeout, self.connect_timeout, self.reconnect_interval, self.setup_timeout) <= 0:
            raise ConfigError("publish_timeout, connect_timeout, reconnect_interval and setup_timeout must be positive")
        if self.log_max_age < 0 or self.log_max_bytes < 0 or self.dedupe_window < 0 or self.dedupe_size < 0:
            raise ConfigError("log_max_age, log_max_bytes, dedupe_window and dedupe_size must be >= 0")
        if not 1 <= self.inbox_partitions <= 1024:
            raise ConfigError(f"inbox_partitions must be 1..1024, not {self.inbox_partitions}")
        if self.inbox_hosts < 0 or not (self.inbox_hosts == 0 or 0 <= self.inbox_host < self.inbox_hosts):
            raise ConfigError("need inbox_hosts >= 0 and 0 <= inbox_host < inbox_hosts")
        if not 1 <= self.inbox_prefetch <= 65535:
            raise ConfigError(f"inbox_prefetch must be 1..65535, not {self.inbox_prefetch}")
        if self.inbox_unclaimed <= 0:
            raise ConfigError("inbox_unclaimed must be positive")

    @classmethod
    def from_url(cls, url: str) -> RabbitSettings:
        """Parse an ``amqp://`` / ``amqps://`` URL (see the module docstring)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("amqp", "amqps"):
            raise ConfigError(f"not an amqp:// or amqps:// URL: {url!r}")
        values: dict[str, Any] = {"tls": scheme == "amqps", "port": 5671 if scheme == "amqps" else 5672}
        try:
            if parts.hostname:
                values["host"] = parts.hostname
            if parts.port is not None:
                values["port"] = parts.port
        except ValueError as exc:
            raise ConfigError(f"bad host or port in {url!r}: {exc}") from exc
        if parts.username is not None:
            values["user"] = unquote(parts.username)
        if parts.password is not None:
            values["password"] = unquote(parts.password)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if path:
            values["vhost"] = unquote(path)
        values.update(url_options(cls, parts.query, scheme=scheme, names=_URL_OPTIONS))
        return cls(**values)

    # ---- names -----------------------------------------------------------------------------

    @property
    def exchange(self) -> str:
        """The topic exchange every message is published to."""
        return self.namespace

    @property
    def log_queue(self) -> str:
        """The stream queue that keeps every message (replay, read_all, new groups' backlog)."""
        return f"{self.namespace}.log"

    @property
    def registry_queue(self) -> str:
        """The stream queue where each group's creation is recorded (its queue, name and pattern)."""
        return f"{self.namespace}.groups"

    @property
    def setup_lock_queue(self) -> str:
        """The exclusive queue a process holds while it creates queues of the squad (one at a time)."""
        return f"{self.namespace}.setup-lock"

    def inbox_partition_queue(self, partition: int) -> str:
        """The queue where the direct messages of the agents of inbox partition ``partition`` wait (quorum,
        or classic under ``fast``; one active consumer)."""
        return f"{self.namespace}.inboxes.{partition}"

    @property
    def owned_inbox_partitions(self) -> frozenset[int]:
        """The inbox partitions a Bus with these settings reads: ``p % inbox_hosts == inbox_host``, or all."""
        if self.inbox_hosts == 0:
            return frozenset(range(self.inbox_partitions))
        return frozenset(p for p in range(self.inbox_partitions) if p % self.inbox_hosts == self.inbox_host)

    def group_queue(self, durable: str) -> str:
        """The queue of a consumer group (``durable`` from ``core.backend.durable_name``; classic under ``fast``)."""
        return f"{self.namespace}.group.{durable}"

    # ---- connecting ------------------------------------------------------------------------

    def driver_url(self) -> str:
        """The URL aio-pika connects with (credentials included; never log it)."""
        scheme = "amqps" if self.tls else "amqp"
        user, password = quote(self.user, safe=""), quote(self.password, safe="")
        return f"{scheme}://{user}:{password}@{self.host}:{self.port}/{quote(self.vhost, safe='')}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``amqps://``, else None."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.tls_ca)

    def redacted(self) -> str:
        """The URL without the password, for logs and errors."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = "" if self.vhost == "/" else quote(self.vhost, safe="")
        return f"{scheme}://{self.user}:***@{self.host}:{self.port}/{vhost}"
