"""KafkaBackend: the Backend protocol over aiokafka (see the package docstring)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from uuid import UUID

from squadbus.backends.kafka._driver import (
    AIOKafkaAdminClient,
    KafkaConnectionError,
    KafkaError,
    NoBrokersAvailable,
    NodeNotReadyError,
)
from squadbus.backends.kafka.connectlogs import ConnectLogs
from squadbus.backends.kafka.consumer import KafkaConsumer, KafkaSubscription
from squadbus.backends.kafka.group_figures import group_figures as describe_groups
from squadbus.backends.kafka.inboxes import KafkaInboxHub
from squadbus.backends.kafka.producer import KafkaPublisher, translate
from squadbus.backends.kafka.read_all import read_all
from squadbus.backends.kafka.replay import replay_execution
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.backends.kafka.topics import TopicLayout, ensure_topics
from squadbus.core import subjects
from squadbus.core.backend import (
    BatchRawHandler,
    ConsumerOptions,
    GroupFigures,
    RawHandler,
    Subscription,
)
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, Closed, ConfigError, ConnectionLost
from squadbus.core.placement import InboxPlacement

logger = logging.getLogger("squadbus.backends.kafka")


class KafkaBackend:
    """Kafka (or any Kafka-protocol broker) as a squadbus backend.

    ``publish`` returns once the broker acknowledged the record
    (``acks="all"``); concurrent publishes share requests. Every
    subscription is its own consumer; see :mod:`.consumer` for commits,
    retries and rebalances. Inboxes (``bus.inbox``) are served by one member of
    the inbox group per backend (:mod:`.inboxes`, ``MultiplexesInboxes``), agents
    placed by partition (``PlacesInboxes``). See :mod:`.topics` for the subject-to-topic layout,
    :mod:`.replay` for replay and :mod:`.read_all` for ``read_all``. Broker-side dedupe by message id is not
    offered: the idempotent producer (when the broker grants it) only removes
    duplicates caused by the producer's own retries.
    """

    literal_subscriptions_cheap = False
    """Every subscription is a consumer reading whole topics: the Bus's broadcast hub reads its broadcast
    subjects with one subscription, or two with ``broadcasts_apart`` (``core/broadcasts.py``)."""

    name = "kafka"

    def __init__(self, settings: KafkaSettings | None = None) -> None:
        self.settings = settings or KafkaSettings()
        self.layout = TopicLayout(self.settings)
        self._publisher = KafkaPublisher(self.settings, self.layout)
        self._subscriptions: set[KafkaSubscription] = set()
        self._partitions: dict[str, list[int]] = {}
        self._inboxes: KafkaInboxHub | None = None
        self._connected = False
        self._closed = False

    @property
    def idempotent(self) -> bool:
        """True when the producer runs with idempotence (the broker granted it)."""
        return self._publisher.idempotent

    @property
    def broadcasts_apart(self) -> bool:
        """True when broadcasts have a topic of their own (``broadcasts_apart``, :mod:`.topics`): a pattern
        matching broadcasts only reads that topic, and the broadcast hub reads no direct message."""
        return self.layout.broadcasts is not None

    async def connect(self) -> None:
        """Create missing topics (if ``create_topics``) and start the producer.

        Raises one ConnectionLost naming the URL and aiokafka's last error when
        the broker is unreachable within ``connect_timeout``; aiokafka's own
        warnings about that connect are not logged (see :mod:`.connectlogs`).
        """
        if self._closed:
            raise Closed("kafka backend is closed")
        if self._connected:
            return
        s = self.settings
        held = ConnectLogs()
        try:
            with held:
                async with asyncio.timeout(s.connect_timeout):
                    if s.create_topics:
                        admin = AIOKafkaAdminClient(
                            bootstrap_servers=list(s.bootstrap_servers), client_id=s.client_id,
                            request_timeout_ms=int(s.connect_timeout * 1000),
                        )
                        try:
                            await admin.start()
                            await ensure_topics(admin, s)
                        finally:
                            await admin.close()
                    await self._publisher.start()
        except (KafkaError, TimeoutError) as exc:
            await self._publisher.stop()
            raise self._connect_error(exc, held.cause()) from exc
        try:
            tuned = self.settings.for_broker(await self._publisher.cluster_id())
        except ConfigError:
            await self._publisher.stop()
            raise
        if tuned is not self.settings:
            logger.info("kafka: tansu broker, group session %d ms / heartbeat %d ms, fetch wait %d ms (set them in "
                        "the URL to change)", tuned.session_timeout_ms, tuned.heartbeat_interval_ms,
                        tuned.fetch_max_wait_ms)
            self.settings = tuned
        self._connected = True

    def _connect_error(self, exc: KafkaError | TimeoutError, cause: str | None) -> BackendError:
        """The error for a failed connect; ``cause`` is aiokafka's last held warning."""
        s = self.settings
        url = f"kafka://{','.join(s.bootstrap_servers)}"
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {s.connect_timeout:g} s"
            return ConnectionLost(f"cannot connect to {url}: {reason}{f' (last error {cause})' if cause else ''}")
        if isinstance(exc, KafkaConnectionError | NodeNotReadyError | NoBrokersAvailable):
            return ConnectionLost(f"cannot connect to {url}: {cause or f'{type(exc).__name__}: {exc}'}")
        return translate(exc, f"connect to {url}")

    async def close(self) -> None:
        """Close every subscription, then flush and stop the producer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._inboxes is not None:
            await self._inboxes.close()
        for sub in list(self._subscriptions):
            await (sub.runtime.close() if sub.runtime is not None else sub.close())
        await self._publisher.stop()

    def _check(self) -> None:
        if self._closed or not self._connected:
            raise Closed("kafka backend is not connected")

    async def publish(self, message: Message) -> None:
        """Publish to the topic of ``message.subject``; returns once the broker acknowledged it."""
        self._check()
        await self._publisher.publish(message)

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish every message and return once the broker acknowledged all (BatchPublisher)."""
        self._check()
        await self._publisher.publish_many(messages)

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> KafkaConsumer:
        """Start a consumer for ``pattern`` in Kafka group ``durable_name(group, pattern)``."""
        return await self._start_subscription(pattern, handler, group, options, None)

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> KafkaConsumer:
        """Like :meth:`subscribe`, handing ``handler`` batches of up to ``batch_size`` (BatchSubscriber)."""
        return await self._start_subscription(pattern, None, group, options, (handler, max_wait))

    async def _start_subscription(
        self, pattern: str, handler: RawHandler | None, group: str | None, options: ConsumerOptions,
        batches: tuple[BatchRawHandler, float] | None,
    ) -> KafkaConsumer:
        self._check()
        subjects.validate_pattern(pattern)
        sub = KafkaSubscription(
            settings=self.settings, layout=self.layout, pattern=pattern, group=group, options=options,
            dead_letter=self.publish, on_close=self._subscriptions.discard, concurrent=batches is not None,
        )
        if batches is not None:
            runtime = KafkaConsumer(sub, options, batches=batches[0], max_wait=batches[1])
        else:
            runtime = KafkaConsumer(sub, options, handler=handler)
        await sub.start()
        self._subscriptions.add(sub)
        runtime.start(f"squadbus-kafka-{sub.kafka_group_id or 'ephemeral'}-consumer")
        return runtime

    def _inbox_hub(self) -> KafkaInboxHub:
        self._check()
        if self._inboxes is None:
            self._inboxes = KafkaInboxHub(self.settings, self.publish)
        return self._inboxes

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> Subscription:
        """Serve ``agent_id``'s direct messages through this backend's inbox group member
        (``MultiplexesInboxes``; see :mod:`.inboxes`); with ``inboxes=false``, a subscription of its own."""
        if not self.settings.inboxes:
            return await self.subscribe(subjects.direct(agent_id), handler, group=group, options=options)
        return await self._inbox_hub().open_inbox(agent_id, handler, group=group, options=options)

    async def inbox_placement(self) -> InboxPlacement:
        """Agent -> inbox partition and the partitions this backend's member owns now (``PlacesInboxes``);
        joins the inbox group first if no inbox was opened yet. With ``inboxes=false`` every agent is
        placeable anywhere (one partition, owned)."""
        if not self.settings.inboxes:
            self._check()
            return InboxPlacement(partitions=1, owned=frozenset({0}), partition_of=lambda _agent: 0)
        return await self._inbox_hub().placement()

    @property
    def inbox_members(self) -> int:
        """Members of the inbox group this backend holds (0 or 1)."""
        return 0 if self._inboxes is None else self._inboxes.members

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(offset, message)`` of one execution from the main topic; see :mod:`.replay`."""
        self._check()
        topic = self.layout.main
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = await self._publisher.partitions(topic)
        if not partitions:
            raise BackendError(f"topic {topic} has no partitions")
        async for item in replay_execution(
            self.settings, topic, partitions, task_execution_id, from_seq=from_seq, since=since
        ):
            yield item

    def read_all(
        self, pattern: str, *, since: datetime | None = None, on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every retained message matching ``pattern``, up to the ends at the start (ReadsAll); see :mod:`.read_all`."""
        self._check()
        subjects.validate_pattern(pattern)
        return read_all(self.settings, self.layout, pattern, since=since, on_unreadable=on_unreadable)

    async def group_figures(self) -> list[GroupFigures]:
        """Lag (end minus committed offsets) of every squadbus group on the broker (DescribesGroups);
        see :mod:`.group_figures`."""
        self._check()
        local = {sub.kafka_group_id: (sub.group, sub.pattern) for sub in self._subscriptions
                 if sub.kafka_group_id is not None and sub.group is not None}
        return await describe_groups(self.settings, self.layout, local=local)
