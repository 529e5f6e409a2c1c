"""Settings of the NATS JetStream backend, parsed from a ``nats://`` or ``tls://`` URL.

``nats://[user:pass@|token@]host:port[,host2:port2,...][?option=value&...]``

Options (all optional): ``profile`` (``durable`` | ``fast``), ``stream``,
``replicas``, ``dedupe_window`` (s), ``max_age`` (s, 0 = unlimited),
``max_bytes``, ``max_msgs`` (-1 = unlimited), ``publish_timeout`` (s, total
including retries), ``ack_timeout`` (s, one PubAck wait), ``max_pending_acks``
(publishes in flight per connection), ``connect_timeout`` (s),
``pull_expires`` (s, lifetime of one pull request), ``max_deliver_margin``,
``claim_interval`` (s, how often multiplexed inboxes re-read every open agent and retry waiting
leases; default ``min(ack_wait / 2, 5)``), ``ordered_groups`` (a group's consumer is created with
the ``pinned_client`` priority policy: one member receives at a time, another takes over when it
stops pulling, so order per execution holds across members; needs nats-server 2.11+),
``name`` (client name), ``creds`` (a ``.creds`` file), ``tls_ca``,
``tls_cert``, ``tls_key`` (paths; ``tls://`` turns TLS on with the system CAs).
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from squadbus.core.errors import ConfigError
from squadbus.core.settings import url_options

DEFAULT_STREAM = "agent-messages"
STREAM_SUBJECTS = ("agent.>",)


class Profile(enum.Enum):
    """What a PubAck means (see docs/backends/nats.md for what each can lose)."""

    DURABLE = "durable"
    """File storage. With the server's ``sync_interval: always`` a PubAck means fsynced (R1)
    or on a quorum of fsynced replicas (R3): an acknowledged message survives a crash or power loss."""
    FAST = "fast"
    """Memory storage. A PubAck means held in the server's RAM: a server restart (R1) or losing a
    quorum of replicas (R3) loses the stream, its messages and the consumer positions."""


_URL_OPTIONS = (
    "profile", "replicas", "max_bytes", "max_msgs", "max_pending_acks", "max_deliver_margin", "dedupe_window",
    "max_age", "publish_timeout", "ack_timeout", "connect_timeout", "pull_expires", "stream", "name", "creds",
    "tls_ca", "tls_cert", "tls_key", "claim_interval", "ordered_groups",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class NatsSettings:
    """How to reach NATS and shape the JetStream stream; ``NatsSettings.from_url(url)``."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    name: str = "squadbus"
    profile: Profile = Profile.DURABLE
    stream: str = DEFAULT_STREAM
    replicas: int = 1
    dedupe_window: float = 120.0
    max_age: float = 0.0
    max_bytes: int = -1
    max_msgs: int = -1
    publish_timeout: float = 15.0
    ack_timeout: float = 2.0
    max_pending_acks: int = 4000
    connect_timeout: float = 5.0
    pull_expires: float = 5.0
    max_deliver_margin: int = 2
    claim_interval: float | None = None
    ordered_groups: bool = False

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("at least one NATS server is needed")
        if not self.stream or any(c in self.stream for c in " .*>\t\r\n"):
            raise ConfigError(f"stream name {self.stream!r} may not contain spaces, '.', '*' or '>'")
        if self.replicas not in (1, 3, 5):
            raise ConfigError("replicas must be 1, 3 or 5")
        if self.dedupe_window < 0 or self.max_age < 0:
            raise ConfigError("dedupe_window and max_age must be >= 0")
        if min(self.publish_timeout, self.ack_timeout, self.connect_timeout, self.pull_expires) <= 0:
            raise ConfigError("publish_timeout, ack_timeout, connect_timeout and pull_expires must be positive")
        if self.claim_interval is not None and self.claim_interval <= 0:
            raise ConfigError("claim_interval must be positive (or unset for the default)")
        if self.pull_expires < 1.0:
            raise ConfigError("pull_expires must be at least 1 second")
        if self.max_pending_acks < 1:
            raise ConfigError("max_pending_acks must be at least 1")
        if self.max_deliver_margin < 0:
            raise ConfigError("max_deliver_margin must be >= 0 (use a large value for 'unlimited')")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")

    @classmethod
    def from_url(cls, url: str) -> NatsSettings:
        """Parse a ``nats://`` / ``tls://`` URL (see the module docstring)."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("nats", "tls"):
            raise ConfigError(f"not a nats:// or tls:// URL: {url!r}")
        netloc = parts.netloc
        values: dict[str, Any] = {"tls": scheme == "tls"}
        if "@" in netloc:
            credentials, netloc = netloc.rsplit("@", 1)
            if ":" in credentials:
                user, password = credentials.split(":", 1)
                values["user"], values["password"] = unquote(user), unquote(password)
            elif credentials:
                values["token"] = unquote(credentials)
        hosts = [h.strip() for h in netloc.split(",") if h.strip()]
        if not hosts:
            hosts = ["127.0.0.1:4222"]
        servers = []
        for host in hosts:
            with_port = host if ":" in host.rsplit("]", 1)[-1] else f"{host}:4222"
            servers.append(f"{scheme}://{with_port}")
        values["servers"] = tuple(servers)
        values.update(url_options(cls, parts.query, scheme="nats", names=_URL_OPTIONS))
        return cls(**values)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``tls://`` or when TLS files are given, else None."""
        if not (self.tls or self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert and self.tls_key:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def redacted(self) -> str:
        """The server list without credentials, for logs."""
        return ",".join(self.servers)
