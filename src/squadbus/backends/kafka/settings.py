"""Settings of the Kafka backend, parsed from a ``kafka://`` URL."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from squadbus.core.errors import ConfigError
from squadbus.core.settings import url_options

DEFAULT_PORT = 9092
SEVEN_DAYS_MS = 7 * 24 * 3600 * 1000
TANSU_SESSION_MS, TANSU_HEARTBEAT_MS = 3_000, 1_000
TANSU_FETCH_WAIT_MS = 50
"""``fetch_max_wait_ms`` on tansu unless the URL sets it: tansu's fetch polls its storage until the wait ends
instead of answering when a record arrives, so the wait is latency there. Scenario 5 (10,000 agents, 4
hosts, 280 msgs/s): p99 54-58 ms at 100, 31-35 ms at 50, tansu 0.39 -> 0.61 of a core (docs/scaling.md)."""
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class Idempotence(enum.Enum):
    """Whether the producer asks the broker for idempotent writes (``InitProducerId``)."""

    AUTO = "auto"
    """Try it; if the broker refuses (tansu 0.6 does), log a warning and go on without it."""
    ON = "on"
    """Require it: ``connect()`` fails if the broker refuses (Apache Kafka >= 0.11)."""
    OFF = "off"
    """Never ask: duplicates after a producer retry are removed by the store."""


@dataclass(frozen=True, kw_only=True, slots=True)
class KafkaSettings:
    """Settings of :class:`~squadbus.backends.kafka.KafkaBackend`.

    ``kafka://host:port[,host2:port2][?option=value&...]``; every field below
    is also a query option (booleans as ``true``/``false``). Topic names:
    ``topic`` carries ``agent.message.*`` and any other subject,
    ``reply_topic`` (default ``<topic>-replies``) ``agent.reply.*`` and
    ``dlq_topic`` (default ``<topic>-dlq``) ``agent.dlq.*``; see
    docs/backends/kafka.md. ``partitions``, ``replication_factor`` and
    ``retention_ms`` apply when squadbus creates the topics
    (``create_topics``); existing topics are left as they are.
    ``session_timeout_ms`` / ``heartbeat_interval_ms`` tune consumer groups
    (10 s / 3 s; on tansu 3 s / 1 s unless the URL sets them, see
    :meth:`for_broker`: tansu completes a group's first join after about half
    the session timeout). ``join_wait=true`` makes a group ``subscribe()``
    return only once the group assigned this member (at most ``join_timeout``
    seconds, then it returns anyway); off by default, because subscribing N
    new groups one after another would then cost N joins instead of letting
    them overlap (a message published after ``subscribe()`` returned is never
    missed either way). ``publish_timeout`` bounds one publish (seconds),
    ``connect_timeout`` bounds ``connect()``. ``commit_interval_ms`` (100):
    a group member (and the inbox hub) commits its settled floor at most this
    often, not once per settled batch: a commit is a broker write (on tansu
    they were a fifth of the broker's CPU at 280 msgs/s to 2,500 inboxes); what
    a crash leaves settled but uncommitted is delivered again (at-least-once),
    and close and a revocation still commit at once. 0: commit as soon as the
    floor moves.

    Inboxes (issue 15, :mod:`.inboxes`): with ``inboxes`` on (the default) a
    direct message is also written to ``inbox_topic`` (default
    ``<topic>.inbox``) keyed by its recipient, and a Bus serves all its open
    inboxes through one member of the group ``inbox_group`` (default
    ``<topic>.inboxes``). ``inbox_hosts``
    > 0 places agents by partition: the Bus with ``inbox_host=i`` is given the
    inbox partitions ``p % inbox_hosts == i`` (a partition whose host is not
    in the group goes to the others); 0 lets the group spread them.
    ``inbox_unclaimed_ms``: how long a record for an agent whose inbox is not
    open anywhere in its partition's owner keeps that partition's commit floor
    before it is released undelivered (logged).

    Broadcasts apart: with ``broadcasts_apart`` on (the default) a squad or
    domain broadcast (``agent.message.broadcast``, ``agent.message.domain.>``)
    is also written to ``broadcast_topic`` (default ``<topic>.broadcasts``),
    and a subscription whose pattern matches broadcasts only (a Bus's broadcast
    hub, or ``agent.message.domain.dev``) reads that topic instead of the main
    one, so it no longer reads (and drops) every direct message of the squad.
    Every process of a squad must agree on it: a reader with it on does not see
    the broadcasts of a publisher with it off. ``broadcast_partitions`` (1) is
    the broadcast topic's partition count when squadbus creates it: broadcasts
    are few, and on tansu every partition costs each consumer reading the topic
    a storage poll per fetch (4 idle Buses: 0.163 of a core with 8, 0.065 with 1).
    """

    bootstrap_servers: tuple[str, ...] = (f"127.0.0.1:{DEFAULT_PORT}",)
    topic: str = "agent-messages"
    reply_topic: str = ""
    dlq_topic: str = ""
    partitions: int = 8
    replication_factor: int = 1
    retention_ms: int = SEVEN_DAYS_MS
    create_topics: bool = True
    idempotence: Idempotence = Idempotence.AUTO
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    fetch_max_wait_ms: int = 100
    commit_interval_ms: int = 100
    max_batch_bytes: int = 256 * 1024
    publish_timeout: float = 30.0
    connect_timeout: float = 15.0
    join_wait: bool = False
    join_timeout: float = 30.0
    client_id: str = "squadbus"
    inboxes: bool = True
    inbox_topic: str = ""
    inbox_group: str = ""
    inbox_hosts: int = 0
    inbox_host: int = 0
    inbox_unclaimed_ms: int = 3_600_000
    broadcasts_apart: bool = True
    broadcast_topic: str = ""
    broadcast_partitions: int = 1
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """The options the URL set (not an option itself)."""

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ConfigError("kafka:// needs at least one host:port")
        if not self.reply_topic:
            object.__setattr__(self, "reply_topic", f"{self.topic}-replies")
        if not self.dlq_topic:
            object.__setattr__(self, "dlq_topic", f"{self.topic}-dlq")
        if not self.inbox_topic:
            object.__setattr__(self, "inbox_topic", f"{self.topic}.inbox")
        if not self.broadcast_topic:
            object.__setattr__(self, "broadcast_topic", f"{self.topic}.broadcasts")
        names = (self.topic, self.reply_topic, self.dlq_topic, self.inbox_topic, self.broadcast_topic)
        for name in names:
            if not _TOPIC_NAME.match(name) or name in (".", ".."):
                raise ConfigError(f"invalid Kafka topic name {name!r}")
        if len(set(names)) != len(names):
            raise ConfigError("topic, reply_topic, dlq_topic, inbox_topic and broadcast_topic must be different topics")
        if not self.inbox_group:
            # One group per squad (topic): squads sharing a broker must not rebalance each other.
            object.__setattr__(self, "inbox_group", f"{self.topic}.inboxes")
        if self.inbox_hosts < 0 or not (self.inbox_hosts == 0 or 0 <= self.inbox_host < self.inbox_hosts):
            raise ConfigError("need inbox_hosts >= 0 and 0 <= inbox_host < inbox_hosts")
        if self.inbox_unclaimed_ms < 1:
            raise ConfigError("inbox_unclaimed_ms must be positive")
        if self.partitions < 1 or self.replication_factor < 1 or self.broadcast_partitions < 1:
            raise ConfigError("partitions, broadcast_partitions and replication_factor must be at least 1")
        if self.retention_ms < -1 or self.retention_ms == 0:
            raise ConfigError("retention_ms must be positive, or -1 for unlimited")
        if self.session_timeout_ms < 1 or not 0 < self.heartbeat_interval_ms < self.session_timeout_ms:
            raise ConfigError("need 0 < heartbeat_interval_ms < session_timeout_ms")
        if self.max_poll_interval_ms < 1 or self.fetch_max_wait_ms < 0 or self.max_batch_bytes < 1024:
            raise ConfigError("max_poll_interval_ms > 0, fetch_max_wait_ms >= 0, max_batch_bytes >= 1024")
        if self.commit_interval_ms < 0:
            raise ConfigError("commit_interval_ms must be >= 0")
        if self.publish_timeout <= 0 or self.connect_timeout <= 0 or self.join_timeout <= 0:
            raise ConfigError("publish_timeout, connect_timeout and join_timeout must be positive")

    def for_broker(self, cluster_id: str | None) -> KafkaSettings:
        """These settings for the broker met at connect: on tansu (told by its default cluster id,
        ``tansu_cluster``) the group timeouts the URL did not set become 3 s / 1 s, so a new group
        joins in ~1.5 s instead of ~5 s, and the fetch wait ``TANSU_FETCH_WAIT_MS``; anything else keeps
        them. Raises ConfigError for ``fetch_max_wait_ms=0`` on tansu (it would never return a record)."""
        if not (cluster_id or "").startswith("tansu"):
            return self
        if self.fetch_max_wait_ms == 0:
            # tansu's fetch reads its storage only while less than max_wait has passed: with 0 it never reads,
            # and every fetch comes back empty (raw client: 0 of 2,800 records, bench_kafka_fetch_wait.py).
            raise ConfigError("fetch_max_wait_ms=0 on tansu: its fetches would never return a record; use 1 or more")
        given = self.given
        session = self.session_timeout_ms if "session_timeout_ms" in given else TANSU_SESSION_MS
        heartbeat = self.heartbeat_interval_ms if "heartbeat_interval_ms" in given else TANSU_HEARTBEAT_MS
        fetch_wait = self.fetch_max_wait_ms if "fetch_max_wait_ms" in given else TANSU_FETCH_WAIT_MS
        if heartbeat >= session:  # only one of the two set, and against the other's tansu value: keep both
            session, heartbeat = self.session_timeout_ms, self.heartbeat_interval_ms
        if (session, heartbeat, fetch_wait) == (self.session_timeout_ms, self.heartbeat_interval_ms,
                                                self.fetch_max_wait_ms):
            return self
        return replace(self, session_timeout_ms=session, heartbeat_interval_ms=heartbeat, fetch_max_wait_ms=fetch_wait)

    def partitions_of(self, topic: str) -> int:
        """How many partitions squadbus gives ``topic`` when it creates it."""
        return self.broadcast_partitions if topic == self.broadcast_topic else self.partitions

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics squadbus uses: main, replies, dead letters, the inbox topic if ``inboxes`` and the
        broadcast topic if ``broadcasts_apart``."""
        return ((self.topic, self.reply_topic, self.dlq_topic) + ((self.inbox_topic,) if self.inboxes else ())
                + ((self.broadcast_topic,) if self.broadcasts_apart else ()))

    @classmethod
    def from_url(cls, url: str) -> KafkaSettings:
        """Parse ``kafka://host:port[,host:port][?partitions=8&idempotence=off&...]``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "kafka":
            raise ConfigError(f"not a kafka:// URL: {url!r}")
        servers = []
        for item in unquote(parts.netloc).split(","):
            host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
            if not host:
                continue
            try:
                number = int(port) if port else DEFAULT_PORT
            except ValueError as exc:
                raise ConfigError(f"bad port in kafka:// URL {url!r}") from exc
            servers.append(f"{host}:{number}")
        values: dict[str, Any] = {}
        if servers:
            values["bootstrap_servers"] = tuple(servers)
        names = [f.name for f in fields(cls) if f.name not in ("bootstrap_servers", "given")]
        options = url_options(cls, parts.query, scheme="kafka", names=names)
        values.update(options, given=frozenset(options))
        return cls(**values)

