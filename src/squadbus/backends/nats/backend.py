"""NatsBackend: the Backend protocol over NATS JetStream (plus Requester and Replayable).

Mapping: every subject under ``agent.>`` is stored in one stream (default
``agent-messages``); a consumer group is a durable pull consumer filtered by
its pattern (see :mod:`.consumers`); ``group=None`` is an ephemeral consumer
starting at new messages. Subjects outside ``agent.>`` (reply inboxes) travel
on core NATS. Agents' inboxes cost no consumer: :meth:`NatsBackend.open_inbox`
serves them all with per-agent cursors and bells (see :mod:`.inboxes`). One
connection per backend, reconnecting forever across every listed server; see
docs/backends/nats.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from uuid import UUID

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.attempts import AttemptLedger
from squadbus.backends.nats.consumers import consumer_config, consumer_exists, ensure_consumer
from squadbus.backends.nats.group_figures import group_figures as describe_groups
from squadbus.backends.nats.inboxes import InboxHub
from squadbus.backends.nats.presence import open_inboxes as list_open_inboxes
from squadbus.backends.nats.publisher import NatsPublisher
from squadbus.backends.nats.raw import InboxClient
from squadbus.backends.nats.read_all import read_all as read_stream
from squadbus.backends.nats.replay import replay as replay_stream
from squadbus.backends.nats.requests import ReplyRouter
from squadbus.backends.nats.settings import STREAM_SUBJECTS, NatsSettings, Profile
from squadbus.backends.nats.subscriber import NatsConsumer, NatsSubscription
from squadbus.backends.nats.takeover import take_over
from squadbus.backends.nats.translate import is_transient, translate
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, GroupFigures, RawHandler, Subscription
from squadbus.core.backoff import CONSUMER_CHECK, STREAM_NOT_READY, Backoff
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, Closed, ConnectionLost
from squadbus.core.inbox_source import InboxPresence

logger = logging.getLogger("squadbus.backends.nats")


class NatsBackend:
    """A JetStream-backed transport; ``NatsBackend(NatsSettings.from_url("nats://127.0.0.1:4222"))``."""

    name = "nats"

    def __init__(self, settings: NatsSettings | None = None) -> None:
        self.settings = settings or NatsSettings()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._publisher: NatsPublisher | None = None
        self._replies: ReplyRouter | None = None
        self._subs: set[NatsSubscription] = set()
        self._configs: dict[NatsSubscription, api.ConsumerConfig] = {}
        self._ledgers: dict[str, AttemptLedger] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._connect_error: Exception | None = None
        self._inboxes: InboxHub | None = None
        self._closed = False

    # ---- connection --------------------------------------------------------------------------

    @property
    def nc(self) -> Client:
        """The live nats-py connection; raises Closed before connect() or after close()."""
        if self._nc is None or self._closed:
            raise Closed("nats backend is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None or self._closed:
            raise Closed("nats backend is not connected")
        return self._js

    async def connect(self) -> None:
        """Connect and create the stream if it does not exist; reconnect forever afterwards.

        Each listed server is tried twice, ``reconnect_time_wait`` apart, within
        ``connect_timeout``; then ConnectionLost names the servers and the last error.
        """
        if self._closed:
            raise Closed("nats backend is closed")
        if self._nc is not None:
            return
        s = self.settings
        nc = InboxClient()  # nats-py's Client with a raw path for pull inboxes (raw.py)
        self._connect_error = None
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=list(s.servers), name=s.name, user=s.user, password=s.password, token=s.token,
                    user_credentials=s.creds, tls=s.ssl_context(), connect_timeout=int(max(1, s.connect_timeout)),
                    # nats-py retries the first connect as often as a reconnect: bounded here,
                    # unbounded once connected (below).
                    allow_reconnect=True, max_reconnect_attempts=1, reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py accepts seconds as float
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                ),
                timeout=s.connect_timeout,
            )
        except Exception as exc:
            gave_up = isinstance(exc, nats.errors.NoServersError | TimeoutError)
            cause = self._connect_error if gave_up and self._connect_error is not None else exc
            with contextlib.suppress(Exception):
                await nc.close()
            raise ConnectionLost(f"cannot connect to {s.redacted()}: {self._connect_reason(exc, cause)}") from cause
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        self._js = nc.jetstream(timeout=s.connect_timeout, publish_async_max_pending=s.max_pending_acks)
        self._publisher = NatsPublisher(nc, self._js, s)
        self._replies = ReplyRouter(nc)
        try:
            await self._ensure_stream()
        except BaseException:
            await self.close()
            raise

    def stream_config(self) -> api.StreamConfig:
        """The stream this backend creates when it is missing."""
        s = self.settings
        return api.StreamConfig(
            name=s.stream,
            subjects=list(STREAM_SUBJECTS),
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.OLD,
            storage=api.StorageType.FILE if s.profile is Profile.DURABLE else api.StorageType.MEMORY,
            num_replicas=s.replicas,
            duplicate_window=s.dedupe_window,
            max_age=s.max_age or None,
            max_bytes=s.max_bytes,
            max_msgs=s.max_msgs,
            allow_direct=True,  # inboxes read an agent's next message with DIRECT.GET (.inboxes)
        )

    async def _ensure_stream(self) -> None:
        # A cluster that just started (or lost its meta leader) answers late or 503 for a few
        # seconds: retry those within twice connect_timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.settings.connect_timeout
        backoff = Backoff(STREAM_NOT_READY)
        while True:
            try:
                await self._ensure_stream_once()
                return
            except BackendError as exc:
                cause = exc.__cause__
                pause = backoff.next()
                if cause is None or not is_transient(cause) or loop.time() + pause > deadline:
                    raise
                logger.info("stream %s not ready (%s); retrying", self.settings.stream, exc)
                await asyncio.sleep(pause)

    async def _ensure_stream_once(self) -> None:
        js, s = self.js, self.settings
        try:
            info = await js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(self.stream_config())
            except Exception as exc:
                raise translate(exc, f"create stream {s.stream}") from exc
            logger.info("created stream %s (%s, R%d)", s.stream, s.profile.value, s.replicas)
            return
        except Exception as exc:
            raise translate(exc, f"look up stream {s.stream}") from exc
        wanted = api.StorageType.FILE if s.profile is Profile.DURABLE else api.StorageType.MEMORY
        if info.config.storage != wanted or (info.config.num_replicas or 1) != s.replicas:
            logger.warning(
                "stream %s exists with storage=%s replicas=%s; settings ask for %s R%d (kept as it is)",
                s.stream, info.config.storage, info.config.num_replicas, wanted, s.replicas,
            )
        if not info.config.allow_direct:
            # A stream of an earlier version: inboxes need direct gets (an update, no data moved).
            info.config.allow_direct = True
            try:
                await js.update_stream(info.config)
            except Exception as exc:  # publishing and groups work without it; inboxes do not
                logger.warning("stream %s: could not turn allow_direct on (%s); inboxes receive nothing until "
                               "it is on", s.stream, translate(exc, "update stream"))
                return
            logger.info("stream %s: allow_direct turned on (for inboxes)", s.stream)

    def _connect_reason(self, exc: Exception, cause: Exception) -> str:
        """Why the first connect failed with ``exc``; ``cause`` is the driver's last error."""
        if not isinstance(exc, TimeoutError):
            return f"{type(cause).__name__}: {cause}"
        reason = f"no answer within {self.settings.connect_timeout:g} s"
        return reason if cause is exc else f"{reason} (last error {type(cause).__name__}: {cause})"

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None:  # the first connect: connect() raises one error naming the last of these
            self._connect_error = exc
            return
        logger.warning("nats connection error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._closed:
            logger.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        nc = self._nc
        logger.info("reconnected to NATS at %s", nc.connected_url.netloc if nc and nc.connected_url else "?")
        for sub in list(self._subs):
            sub.reset_credit()
        if self._inboxes is not None:
            self._inboxes.reconnected()

    async def close(self) -> None:
        """Close every subscription (handlers in progress finish), flush, disconnect. Idempotent."""
        if self._closed:
            return
        if self._inboxes is not None:
            await self._inboxes.close()
        for sub in list(self._subs):
            await (sub.runtime.close() if sub.runtime is not None else sub.close())
        for task in list(self._checks):
            task.cancel()
        if self._replies is not None:
            await self._replies.close()
        self._closed = True
        if self._publisher is not None:
            self._publisher.close()
        nc = self._nc
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=2)
            # A server that is gone makes nats-py's close raise ConnectionResetError while
            # draining its writer: the connection is closed either way.
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()

    # ---- Backend -----------------------------------------------------------------------------

    async def publish(self, message: Message) -> None:
        """Store ``message`` in the stream (returns after its PubAck), or send it on core NATS
        when its subject is outside ``agent.>`` (replies). Retries transient failures within
        ``publish_timeout``; raises ConnectionLost, PublishFailed or BackendTimeout."""
        if self._closed or self._publisher is None:
            raise Closed("nats backend is not connected")
        await self._publisher.publish(message)

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish every message with its PubAck awaited concurrently (BatchPublisher).

        The publishes start in list order, so the stream keeps that order
        unless a transient failure makes one of them retry.
        """
        if self._closed or self._publisher is None:
            raise Closed("nats backend is not connected")
        publish = self._publisher.publish
        outcomes = await asyncio.gather(*(publish(m) for m in messages), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> NatsConsumer:
        """Join the durable consumer of ``(group, pattern)`` (creating it), or create an
        ephemeral one for ``group=None``, and start pulling. With ``options.take_over`` the
        group's unacknowledged messages are queued for redelivery first (see :mod:`.takeover`)."""
        return await self._start_subscription(pattern, handler, group, options, None)

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> Subscription:
        """Serve ``agent_id``'s direct messages to ``handler`` with no JetStream consumer of its own
        (MultiplexesInboxes; see :mod:`.inboxes`)."""
        if self._closed:
            raise Closed("nats backend is closed")
        hub = self._inboxes
        if hub is None:
            hub = self._inboxes = InboxHub(self)
        return await hub.open(agent_id, handler, group=group, options=options)

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> NatsConsumer:
        """Like :meth:`subscribe`, handing ``handler`` batches of up to ``batch_size`` (BatchSubscriber)."""
        return await self._start_subscription(pattern, None, group, options, (handler, max_wait))

    async def _start_subscription(
        self, pattern: str, handler: RawHandler | None, group: str | None, options: ConsumerOptions,
        batches: tuple[BatchRawHandler, float] | None,
    ) -> NatsConsumer:
        subjects.validate_squad_pattern(pattern)
        js = self.js
        config = consumer_config(pattern, group, options, self.settings)
        await ensure_consumer(js, self.settings.stream, config)
        assert config.name is not None
        if options.take_over and group is not None:
            await take_over(self.nc, js, self.settings.stream, config.name, timeout=self.settings.connect_timeout)
        sub = NatsSubscription(self, pattern=pattern, group=group, consumer=config.name, options=options)
        if batches is not None:
            sub.use_batches()
            runtime = NatsConsumer(sub, options, batches=batches[0], max_wait=batches[1])
        else:
            runtime = NatsConsumer(sub, options, handler=handler)
        self._subs.add(sub)
        self._configs[sub] = config
        await sub.start()
        runtime.start(f"squadbus-nats-{group or 'ephemeral'}-consumer")
        return runtime

    def attempt_ledger(self, consumer: str, *, open_limit: int) -> AttemptLedger:
        """The attempts this process handed out for ``consumer``, shared by its members here."""
        ledger = self._ledgers.get(consumer)
        if ledger is None:
            ledger = self._ledgers[consumer] = AttemptLedger(open_limit=open_limit)
        return ledger

    async def forget(self, sub: NatsSubscription) -> None:
        """Called by a closing subscription: delete its consumer if it was ephemeral."""
        self._subs.discard(sub)
        if not any(other.consumer == sub.consumer for other in self._subs):
            self._ledgers.pop(sub.consumer, None)
        config = self._configs.pop(sub, None)
        if config is not None and not config.durable_name and self._js is not None and not self._closed:
            try:
                await self._js.delete_consumer(self.settings.stream, sub.consumer)
            except Exception as exc:  # it expires by inactive_threshold anyway
                logger.debug("could not delete ephemeral consumer %s: %s", sub.consumer, exc)

    def schedule_consumer_check(self, sub: NatsSubscription) -> None:
        """Recreate ``sub``'s consumer if the server lost it (e.g. an ephemeral after a restart)."""
        if any(task.get_name() == f"check-{sub.consumer}" for task in self._checks):
            return
        task = asyncio.get_running_loop().create_task(self._check_consumer(sub), name=f"check-{sub.consumer}")
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_consumer(self, sub: NatsSubscription) -> None:
        config = self._configs.get(sub)
        backoff = Backoff(CONSUMER_CHECK)
        while config is not None and sub in self._subs and not self._closed:
            try:
                if not await consumer_exists(self.js, self.settings.stream, sub.consumer):
                    logger.warning("consumer %s is gone; recreating it", sub.consumer)
                    await ensure_consumer(self.js, self.settings.stream, config)
                sub.reset_credit()
                return
            except BackendError as exc:
                logger.debug("consumer check of %s failed (%s); retrying", sub.consumer, exc)
                await backoff.sleep()

    # ---- Requester and Replayable ------------------------------------------------------------

    async def request(self, message: Message, *, timeout: float) -> Message:
        """Publish ``message`` to the stream with a core-NATS ``reply_to`` inbox; return the first
        reply, or raise RequestTimeout after ``timeout`` seconds."""
        if self._closed or self._replies is None:
            raise Closed("nats backend is not connected")
        return await self._replies.request(message, timeout, self.publish)

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(stream_seq, message)`` of one execution; cost O(stream after the start point)."""
        async for item in replay_stream(
            self.js, self.settings.stream, task_execution_id, from_seq=from_seq, since=since
        ):
            yield item

    def read_all(
        self, pattern: str, *, since: datetime | None = None, on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every retained message matching ``pattern``, up to the stream's end at the start (ReadsAll);
        see :mod:`.read_all`."""
        subjects.validate_pattern(pattern)
        return read_stream(self.js, self.settings.stream, pattern, since=since, on_unreadable=on_unreadable)

    async def group_figures(self) -> list[GroupFigures]:
        """Lag, pending, redeliveries and dead letters of every durable consumer (DescribesGroups);
        see :mod:`.group_figures`."""
        return await describe_groups(self)

    async def open_inboxes(self) -> list[InboxPresence]:
        """Agents whose inbox lease is held by a live hub, in any process (ListsInboxes); see :mod:`.presence`."""
        return await list_open_inboxes(self)
