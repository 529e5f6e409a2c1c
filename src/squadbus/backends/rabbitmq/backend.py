"""RabbitBackend: the Backend protocol over RabbitMQ (plus Requester, Replayable, ReadsAll, BatchPublisher,
BatchSubscriber, DescribesGroups).

Mapping (docs/backends/rabbitmq.md says why):

* one durable **topic exchange** ``<namespace>``; a message's routing key is its subject;
* one **stream queue** ``<namespace>.log`` bound with ``#``: the log every message is kept in
  (``log_max_age``), read by offset for replay, ``read_all`` and a new group's backlog;
* a consumer group ``(group, pattern)`` is a durable **quorum queue**
  ``<namespace>.group.<durable_name>`` bound with the pattern; its members are competing consumers;
  a group created with ``StartFrom.EARLIEST`` first gets a copy of what the log holds for its pattern;
* ``group=None`` is an exclusive, auto-deleted queue bound with the pattern (new messages only);
* one more stream queue ``<namespace>.groups`` records each group created (``group_figures``);
* ``profile=fast``: group and inbox queues are classic queues and messages transient (the log stays
  a stream); attempts are then counted by each consumer (:mod:`.subscriber`);
* requests get their replies by direct reply-to (:mod:`.requests`): no queue per requester;
* agents' inboxes: ``inbox_partitions`` queues ``<namespace>.inboxes.<p>`` (single active consumer), a
  direct message routed also to its agent's partition, one channel per Bus for all its inboxes
  (:mod:`.inboxes`; MultiplexesInboxes, PlacesInboxes).

One robust connection per backend (aio-pika reconnects and restores channels, queues,
bindings and consumers), one confirm channel for publishing, one channel per subscription.

Queues that several processes may create at once (group queues, inbox partitions) are created under the
namespace's **setup lock**, an exclusive queue ``<namespace>.setup-lock`` held by one connection at a
time (the broker drops it with its connection, so a crashed holder frees it). Checking, creating and
filling a queue with the log's backlog then happens once, and no process consumes a quorum queue another
one is still creating: RabbitMQ answers a declare of such a queue before its Ra server runs, and a
``basic.consume`` on it then closes the consumer's whole connection with ``541 INTERNAL_ERROR``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import aio_pika
import aio_pika.abc
import aiormq.exceptions

from squadbus.backends.rabbitmq.backlog import Accept, BacklogCopier
from squadbus.backends.rabbitmq.connectlogs import ConnectLogs
from squadbus.backends.rabbitmq.group_figures import group_figures as describe_groups
from squadbus.backends.rabbitmq.group_figures import registry_record
from squadbus.backends.rabbitmq.inboxes import RabbitInboxHub
from squadbus.backends.rabbitmq.log import Offset, read_log
from squadbus.backends.rabbitmq.publisher import RabbitPublisher
from squadbus.backends.rabbitmq.requests import DirectReplies
from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.backends.rabbitmq.subscriber import RabbitConsumer, RabbitSubscription
from squadbus.backends.rabbitmq.topology import (
    binding_key,
    group_queue_arguments,
    inbox_queue_arguments,
    log_queue_arguments,
    short_name,
)
from squadbus.backends.rabbitmq.translate import translate
from squadbus.core import subjects
from squadbus.core.backend import (
    BatchRawHandler,
    ConsumerOptions,
    GroupFigures,
    RawHandler,
    StartFrom,
    durable_name,
    read_back,
)
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import BackendError, BackendTimeout, Closed, ConfigError, ConnectionLost, MalformedMessage
from squadbus.core.inbox_source import InboxHolder
from squadbus.core.placement import InboxPlacement

logger = logging.getLogger("squadbus.backends.rabbitmq")

CHANNEL_RESERVE = 64
"""Channels of the connection kept free for publishing, group creation and log reads: a subscription
(one channel each) past ``channel_max - CHANNEL_RESERVE`` is refused (the broker would close the whole
connection, every subscription with it, on the channel past its ``channel_max``)."""

class RabbitBackend:
    """A RabbitMQ-backed transport; ``RabbitBackend(RabbitSettings.from_url("amqp://127.0.0.1:5672/"))``."""

    name = "rabbitmq"

    def __init__(self, settings: RabbitSettings | None = None) -> None:
        self.settings = settings or RabbitSettings()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: RabbitPublisher | None = None
        self._subs: set[RabbitSubscription] = set()
        self._group_locks: dict[str, asyncio.Lock] = {}
        self._probe: aio_pika.abc.AbstractConnection | None = None
        self._probe_lock = asyncio.Lock()
        self._setup_mutex = asyncio.Lock()  # taking and giving back the setup lock (see setup_lock)
        self._setup_users = 0
        self._setup_channel: aio_pika.abc.AbstractChannel | None = None
        self._backlog = BacklogCopier(self)
        self.inboxes = RabbitInboxHub(self)
        """The inbox hub: every open inbox of this backend (see :mod:`.inboxes`)."""
        self._replies: DirectReplies | None = None
        self._closed = False

    # ---- connection --------------------------------------------------------------------------

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        """The live connection; raises Closed before connect() or after close()."""
        if self._connection is None or self._closed:
            raise Closed("rabbitmq backend is not connected")
        return self._connection

    @property
    def connected(self) -> bool:
        """True while the connection is up (False while it reconnects, and after close())."""
        connection = self._connection
        return connection is not None and not self._closed and connection.connected.is_set()

    @property
    def publisher(self) -> RabbitPublisher:
        if self._publisher is None or self._closed:
            raise Closed("rabbitmq backend is not connected")
        return self._publisher

    async def connect(self) -> None:
        """Connect, then declare the exchange and the log stream if they are missing.

        Raises ConnectionLost naming the URL (without the password) and the cause
        when the broker cannot be reached within ``connect_timeout``.
        """
        if self._closed:
            raise Closed("rabbitmq backend is closed")
        if self._connection is not None:
            return
        s = self.settings
        try:
            with ConnectLogs() as held:
                connection = await asyncio.wait_for(
                    aio_pika.connect_robust(
                        s.driver_url(), timeout=s.connect_timeout, ssl_context=s.ssl_context(),
                        client_properties={"connection_name": f"squadbus {s.namespace}"},
                        reconnect_interval=s.reconnect_interval,
                    ),
                    timeout=s.connect_timeout + 1,
                )
            held.release()
        except Exception as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            reason = f"no answer within {s.connect_timeout:g} s" if isinstance(exc, TimeoutError) else (
                f"{type(cause).__name__}: {cause}")
            raise ConnectionLost(f"cannot connect to {s.redacted()}: {reason}") from cause
        self._connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True)
            await self._declare_topology(channel)
            self._publisher = RabbitPublisher(channel, s)
            await self._publisher.setup()
        except BaseException:
            await self.close()
            raise

    async def _declare_topology(self, channel: aio_pika.abc.AbstractChannel) -> None:
        s = self.settings
        what = f"declare the exchange {s.exchange}, the log {s.log_queue} and the registry {s.registry_queue}"
        try:
            exchange = await channel.declare_exchange(s.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        except Exception as exc:
            raise translate(exc, what) from exc
        setup = await self.connection.channel()
        try:
            log = await setup.declare_queue(
                s.log_queue, durable=True, arguments=log_queue_arguments(s.log_max_age, s.log_max_bytes)
            )
            await log.bind(exchange, "#")
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            logger.warning("log stream %s exists with other settings (kept as it is): %s", s.log_queue, exc)
            setup = await self.connection.channel()  # the refusal closed the channel
        except Exception as exc:
            raise translate(exc, what) from exc
        try:
            await setup.declare_queue(s.registry_queue, durable=True, arguments=log_queue_arguments(0, 0))
        except Exception as exc:
            raise translate(exc, what) from exc
        finally:
            with contextlib.suppress(Exception):
                await setup.close()

    async def close(self) -> None:
        """Close every subscription (handlers in progress finish), then the connection. Idempotent."""
        if self._closed:
            return
        for sub in list(self._subs):
            await (sub.runtime.close() if sub.runtime is not None else sub.close())
        self._closed = True
        if self._replies is not None:
            await self._replies.close()
        await self.inboxes.close()
        await self._backlog.close()
        if self._probe is not None:
            with contextlib.suppress(Exception):
                await self._probe.close()
        connection = self._connection
        if connection is not None:
            up = connection.connected.is_set()
            with contextlib.suppress(Exception):  # a broker that is gone cannot be said goodbye to
                async with asyncio.timeout(5 if up else 1):
                    await connection.close()

    # ---- Backend -----------------------------------------------------------------------------

    async def publish(self, message: Message) -> None:
        """Publish to the exchange and return after the broker's confirm; retries transient failures
        within ``publish_timeout``; raises ConnectionLost, PublishFailed or BackendTimeout."""
        await self.publisher.publish(message)

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish every message with the confirms awaited together (BatchPublisher).

        The publishes are written in list order on one channel, so the queues keep that order
        unless a transient failure makes one of them retry.
        """
        publish = self.publisher.publish
        outcomes = await asyncio.gather(*(publish(m) for m in messages), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def request(self, message: Message, *, timeout: float) -> Message:
        """Publish ``message`` with this backend's direct reply-to address in ``reply_to`` and return the
        first reply (Requester; see :mod:`.requests`). Raises RequestTimeout after ``timeout`` seconds,
        ConnectionLost when the connection is lost meanwhile, Closed when the backend closes meanwhile."""
        replies = self._replies
        if replies is None:
            replies = self._replies = DirectReplies(self.connection, self.settings.namespace)
        return await replies.request(message, timeout, self.publish)

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> RabbitConsumer:
        """Join the quorum queue of ``(group, pattern)`` (creating it, with the log's backlog when it
        starts at EARLIEST), or bind an exclusive queue for ``group=None``, and start consuming."""
        return await self._start_subscription(pattern, handler, group, options, None)

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> RabbitConsumer:
        """Like :meth:`subscribe`, handing ``handler`` batches of up to ``batch_size`` (BatchSubscriber)."""
        return await self._start_subscription(pattern, None, group, options, (handler, max_wait))

    async def _start_subscription(
        self, pattern: str, handler: RawHandler | None, group: str | None, options: ConsumerOptions,
        batches: tuple[BatchRawHandler, float] | None,
    ) -> RabbitConsumer:
        subjects.validate_squad_pattern(pattern)
        binding_key(pattern)  # refuses a pattern too long for AMQP before anything is created
        self._check_channel_room()
        queue_name = None
        if group is not None:
            queue_name = short_name(self.settings.group_queue(durable_name(group, pattern)))
            await self._ensure_group(queue_name, group, pattern, options.start)
        sub = RabbitSubscription(self, pattern=pattern, group=group, queue_name=queue_name, options=options)
        self._subs.add(sub)
        try:
            await sub.start()
        except BaseException as exc:
            await sub.close()
            if isinstance(exc, Exception) and not isinstance(exc, ConfigError):
                raise translate(exc, f"subscribe to {pattern}") from exc
            raise
        if batches is not None:
            runtime = RabbitConsumer(sub, options, batches=batches[0], max_wait=batches[1])
        else:
            runtime = RabbitConsumer(sub, options, handler=handler)
        runtime.start(f"squadbus-rabbitmq-{group or 'fanout'}")
        return runtime

    def _check_channel_room(self) -> None:
        tune = getattr(self.connection.transport.connection, "connection_tune", None)  # type: ignore[union-attr]
        channel_max = int(getattr(tune, "channel_max", 0) or 0)
        held = len(self._subs)
        if channel_max and held >= channel_max - CHANNEL_RESERVE:
            raise BackendError(
                f"this Bus holds {held} subscriptions, one AMQP channel each, and the broker's "
                f"channel_max is {channel_max}: open the rest in another Bus (process) or raise channel_max "
                "on the broker (inboxes share one channel and are not counted)")

    def forget(self, sub: RabbitSubscription) -> None:
        """Called by a closing subscription."""
        self._subs.discard(sub)

    async def declare_group_queue(
        self, channel: aio_pika.abc.AbstractChannel, name: str, *, inbox: bool = False
    ) -> aio_pika.abc.AbstractQueue:
        """Declare a group's (or an inbox partition's) queue on ``channel`` (idempotent; restored after a
        reconnect).

        Raises ConfigError when the queue exists with other arguments: declared under the other
        ``profile`` (quorum vs classic), for a group another ``single_active_consumer``, for an inbox
        partition another ``log_max_age`` (its message TTL).
        """
        s = self.settings
        classic = s.classic_queues
        if inbox:
            arguments = inbox_queue_arguments(classic=classic, max_age=s.log_max_age)
        else:
            arguments = group_queue_arguments(s.single_active_consumer, classic=classic)
        try:
            return await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            asks = f"profile={s.profile.value} ({arguments['x-queue-type']} queue)"
            if inbox:
                asks += f" and log_max_age={s.log_max_age:g} (message TTL of the inbox partitions)"
            else:
                asks += f" and single_active_consumer={str(s.single_active_consumer).lower()}"
            raise ConfigError(
                f"the queue {name} exists with other arguments than this URL asks for ({asks}; every process of "
                f"the squad must use the same settings, delete the queue to change them): {exc}") from exc

    def local_groups(self) -> list[tuple[str, str, str]]:
        """``(queue, group, pattern)`` of every group this backend has a member of."""
        return [(sub._queue_name, sub.group, sub.pattern) for sub in self._subs
                if sub.group is not None and sub._queue_name is not None]

    async def group_figures(self) -> list[GroupFigures]:
        """Lag (ready messages) of every group queue (DescribesGroups); see :mod:`.group_figures`
        for what AMQP cannot tell (pending, redeliveries, dead letters are None)."""
        return await describe_groups(self)

    async def ready_counts(self, names: Sequence[str]) -> dict[str, int | None]:
        """Messages ready in each queue of ``names`` (passive declares on one channel); None for a
        queue that does not exist."""
        try:
            return await self._queue_stats(names)
        except Exception as exc:
            raise translate(exc, f"look up {len(names)} queues") from exc

    async def _queue_exists(self, name: str) -> bool:
        return (await self._queue_stats([name]))[name] is not None

    async def _queue_stats(self, names: Sequence[str]) -> dict[str, int | None]:
        # A passive declare of a missing queue closes its channel. On the robust connection the
        # channel would try to reopen under the same number while a new one is opened (the broker
        # closes the connection: "second 'channel.open' seen"), so probes use a plain connection of
        # their own, one at a time.
        found: dict[str, int | None] = {}
        async with self._probe_lock:
            probe = await self._probe_connection()
            channel: aio_pika.abc.AbstractChannel | None = None
            try:
                for name in names:
                    if channel is None or channel.is_closed:
                        channel = await probe.channel()
                    try:
                        queue = await channel.declare_queue(name, passive=True)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        found[name] = None  # and the broker closed the channel
                        continue
                    result = queue.declaration_result
                    found[name] = int(result.message_count or 0) if result is not None else 0
            finally:
                if channel is not None and not channel.is_closed:
                    with contextlib.suppress(Exception):
                        await channel.close()
        return found

    async def _probe_connection(self) -> aio_pika.abc.AbstractConnection:
        """The plain connection of passive declares and the setup lock (opened on first use)."""
        if self._probe is None or self._probe.is_closed:
            s = self.settings
            self._probe = await aio_pika.connect(
                s.driver_url(), timeout=s.connect_timeout, ssl_context=s.ssl_context(),
                client_properties={"connection_name": f"squadbus {s.namespace} probe"},
            )
        return self._probe

    @contextlib.asynccontextmanager
    async def setup_lock(self) -> AsyncIterator[None]:
        """Hold the namespace's setup lock: one process at a time (see the module docstring).

        Tasks of this Bus share one hold (the first takes the lock, the last gives it back), so groups
        created at once here still share their reads of the log; each group's own lock keeps its creation
        one at a time. Waits while another process holds it, up to ``setup_timeout`` (then BackendTimeout).
        """
        async with self._setup_mutex:
            if self._setup_users == 0:
                self._setup_channel = await self._take_setup_lock()
            self._setup_users += 1
        try:
            yield
        finally:
            self._setup_users -= 1
            if self._setup_users == 0:
                await asyncio.shield(self._give_setup_lock())  # given back even when this task is cancelled

    async def _take_setup_lock(self) -> aio_pika.abc.AbstractChannel:
        # The lock is the exclusive queue <namespace>.setup-lock of the probe connection: another connection
        # declaring it is refused (RESOURCE_LOCKED, closing that channel) until it is deleted or its
        # connection goes. The same connection could declare it again: hence the mutex and the one hold.
        s = self.settings
        name = s.setup_lock_queue
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.setup_timeout
        pause = 0.01
        while True:
            channel: aio_pika.abc.AbstractChannel | None = None
            try:
                async with self._probe_lock:
                    channel = await (await self._probe_connection()).channel()
                await channel.declare_queue(name, exclusive=True)
                return channel
            except aiormq.exceptions.ChannelLockedResource:  # held elsewhere; the refusal closed the channel
                left = deadline - loop.time()
                if left <= 0:
                    raise BackendTimeout(
                        f"another process has held the setup lock {name} for more than {s.setup_timeout:g} s "
                        "(it creates the squad's queues and copies the log's backlog into them; raise "
                        "setup_timeout for a long log)") from None
                await asyncio.sleep(min(pause, left))
                pause = min(0.2, pause * 2)
            except BaseException as exc:
                if channel is not None:
                    # Cancelled in the declare, the broker may have made this connection the holder before its
                    # answer was read: give it back, or other processes wait until this Bus closes.
                    await asyncio.shield(_close_lock_channel(channel, name, delete=not isinstance(exc, Exception)))
                if isinstance(exc, Exception):
                    raise translate(exc, f"take the setup lock {name}") from exc
                raise

    async def _give_setup_lock(self) -> None:
        async with self._setup_mutex:
            channel = self._setup_channel
            if self._setup_users or channel is None:
                return  # taken again meanwhile: the new hold gives it back
            self._setup_channel = None
            # Not deleted (connection gone): the broker dropped the exclusive queue with the connection.
            with contextlib.suppress(Exception):
                await channel.queue_delete(self.settings.setup_lock_queue)
            with contextlib.suppress(Exception):
                await channel.close()

    async def _register(self, name: str, group: str, pattern: str) -> None:
        try:
            await self.publisher.publish_to_queue(
                self.settings.registry_queue, registry_record(name, group, pattern), f"record the group {name}")
        except Exception as exc:  # the group works without it; only other processes' figures miss it
            logger.warning("could not record the group queue %s in %s (group_figures of other processes will "
                           "not list it): %s", name, self.settings.registry_queue, exc)

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> InboxHolder[Any]:
        """Serve ``agent_id``'s inbox from its partition queue (MultiplexesInboxes; see :mod:`.inboxes`):
        the first open of this Bus creates the squad's partition queues if missing (with the log's
        backlog) and consumes those this Bus reads. No broker resource per agent."""
        try:
            return await self.inboxes.open_inbox(agent_id, handler, group=group, options=options)
        except (ConfigError, Closed):
            raise
        except Exception as exc:
            raise translate(exc, f"open the inbox of {agent_id}") from exc

    async def inbox_placement(self) -> InboxPlacement:
        """The inbox partitions this Bus reads and each agent's partition (PlacesInboxes; see
        :mod:`.placement`)."""
        return self.inboxes.placement()

    async def _ensure_group(self, name: str, group: str, pattern: str, start: StartFrom) -> None:
        lock = self._group_locks.setdefault(name, asyncio.Lock())
        async with lock, self.setup_lock():
            what = f"create the queue {name}"
            try:
                created = not await self._queue_exists(name)
                channel = await self.connection.channel()
                try:
                    queue = await self.declare_group_queue(channel, name)
                    await queue.bind(self.settings.exchange, binding_key(pattern))
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except ConfigError:
                raise
            except Exception as exc:
                raise translate(exc, what) from exc
            if created:
                await self._register(name, group, pattern)
            if created and start is StartFrom.EARLIEST:
                try:
                    copied = await self.copy_backlog(name, pattern)
                except BaseException as exc:
                    # Without its backlog the queue must not stay: the next subscribe would find it and
                    # copy nothing. What it received since the bind is in the log, so the next copy has it.
                    await self.delete_queue(name)
                    if isinstance(exc, Exception):
                        raise translate(exc, f"copy the log's backlog into {name}") from exc
                    raise
                logger.info("created group queue %s for %s with %d messages from the log", name, pattern, copied)

    async def delete_queue(self, name: str) -> None:
        """Delete the queue ``name`` (logged when it fails: a queue left without its backlog)."""
        try:
            channel = await self.connection.channel()
            try:
                await channel.queue_delete(name)
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except Exception as exc:
            logger.error("could not delete the queue %s after its backlog copy failed (its group will start "
                         "without the backlog; delete it by hand): %s", name, exc)

    async def copy_backlog(self, queue: str, pattern: str, accept: Accept | None = None) -> int:
        """Copy what the log holds for ``pattern`` into ``queue`` (see :mod:`.backlog`: groups created at
        the same time share one read of the log). Messages published between the bind and the pass's
        marker are in both: they reach the group twice (at-least-once); nothing stored before the bind
        is missed."""
        return await self._backlog.copy(queue, pattern, accept)

    # ---- Replayable and ReadsAll -------------------------------------------------------------

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(log offset, message)`` of one execution, reading the log from ``from_seq`` (or from a
        second before ``since``) to now; cost O(log after the start point)."""
        start: Offset = "first"
        if from_seq > 0:
            start = from_seq
        elif since is not None:
            start = since - timedelta(seconds=1)  # the broker's timestamps have second precision
        async for offset, msg in read_log(self, start):
            if offset < from_seq:
                continue
            try:
                message = decode(msg.body, max_content_bytes=sys.maxsize)
            except MalformedMessage:
                continue
            if message.task_execution_id != task_execution_id:
                continue
            if since is not None and message.created_at < since:
                continue
            yield offset, message

    async def read_all(
        self, pattern: str, *, since: datetime | None = None, on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every message the log holds matching ``pattern`` (and ``since``), up to a marker appended when
        the read starts (ReadsAll)."""
        subjects.validate_pattern(pattern)
        start: Offset = "first" if since is None else since - timedelta(seconds=1)
        async for _, msg in read_log(self, start):
            message = read_back(msg.body, pattern, since, on_unreadable)
            if message is not None:
                yield message


async def _close_lock_channel(channel: aio_pika.abc.AbstractChannel, name: str, *, delete: bool) -> None:
    """Close a channel of a setup-lock take that failed; ``delete``: drop the lock queue first (a queue this
    connection does not hold is refused, which is fine)."""
    if delete:
        with contextlib.suppress(Exception):
            await channel.queue_delete(name)
    with contextlib.suppress(Exception):
        await channel.close()
