"""RedisBackend: the Backend protocol over Redis Streams (see docs/backends/redis.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from squadbus.backends.redis._driver import (
    FAILURES,
    TRANSIENT,
    RawEntry,
    Reconnects,
    aioredis,
    call,
    entry_parts,
    no_retry,
    redis_errors,
    translate,
)
from squadbus.backends.redis.consumer import ConsumerContext, RedisCounters, RedisSubscription
from squadbus.backends.redis.ephemeral import EphemeralSource
from squadbus.backends.redis.group import GroupSource
from squadbus.backends.redis.group_figures import group_figures as describe_groups
from squadbus.backends.redis.inboxes import InboxHub
from squadbus.backends.redis.layout import KeyLayout, entry_id_of, position_of
from squadbus.backends.redis.presence import open_inboxes as list_open_inboxes
from squadbus.backends.redis.publisher import RedisPublisher
from squadbus.backends.redis.read_all import read_all
from squadbus.backends.redis.retention import Trimmer
from squadbus.backends.redis.settings import Profile, RedisSettings
from squadbus.backends.redis.watcher import StreamWatcher
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, GroupFigures, RawHandler, Subscription
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import Closed, ConfigError, ConnectionLost, MalformedMessage, RequestTimeout
from squadbus.core.inbox_source import InboxPresence

logger = logging.getLogger("squadbus.backends.redis")

COMMAND_CONNECTIONS = 4
"""Connections a backend instance uses for commands that do not block (see ``connect``)."""

_REPLAY_PAGE = 500
_REPLAY_CLOCK_SLACK_MS = 60_000


class RedisBackend:
    """Redis Streams backend. Also :class:`~squadbus.core.backend.Replayable`,
    :class:`~squadbus.core.backend.Requester` and
    :class:`~squadbus.core.inbox_source.MultiplexesInboxes` (see :mod:`.inboxes`).

    Delivery contract as in ``squadbus.core.backend.Backend``; what is kept
    where, and what each profile can lose, is in docs/backends/redis.md.
    """

    name = "redis"

    def __init__(self, settings: RedisSettings | None = None) -> None:
        self.settings = settings or RedisSettings()
        self.layout = KeyLayout(self.settings.prefix, self.settings.partitions)
        self.counters = RedisCounters()
        self._client: aioredis.Redis | None = None
        self._commands: aioredis.Redis | None = None
        self._reconnects: Reconnects | None = None
        self._publisher: RedisPublisher | None = None
        self._trimmer: Trimmer | None = None
        self._subscriptions: set[RedisSubscription] = set()
        self._inboxes: InboxHub | None = None
        self._reply_token = secrets.token_hex(8)
        self._watcher: StreamWatcher | None = None
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, check the durable profile's server settings, start the trimmer. Idempotent."""
        if self._closed:
            raise Closed("redis backend is closed")
        if self._client is not None:
            return
        s = self.settings
        tls: dict[str, Any] = {}
        if s.tls:
            tls = {"ssl": True, "ssl_ca_certs": s.tls_ca_certs, "ssl_cert_reqs": "required" if s.tls_verify else "none",
                   "ssl_check_hostname": s.tls_verify}
        client = aioredis.Redis(
            host=s.host, port=s.port, db=s.db, username=s.username, password=s.password,
            socket_timeout=None, socket_connect_timeout=s.connect_timeout, socket_keepalive=True,
            client_name="squadbus", retry=no_retry(), **tls,
        )
        # Commands that do not block (publishes, the inbox hub's reads and acks, wake-ups) share a few
        # connections and wait for a free one, instead of a pool that grows with every burst of
        # concurrent commands and keeps what it grew (issue 15: 13-22 connections per simulate host).
        # Blocking reads (the stream watcher, Pub/Sub, group members) stay on `client`.
        pool = client.connection_pool
        commands = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool(
            max_connections=COMMAND_CONNECTIONS, timeout=None,
            connection_class=pool.connection_class, **pool.connection_kwargs))
        reconnects = Reconnects(client)
        try:
            async with asyncio.timeout(s.connect_timeout):
                await call(client, "PING")
                wait_aof = await self._check_profile(client)
        except redis_errors.AuthenticationError as exc:
            await client.aclose()
            await commands.aclose()
            raise ConfigError(f"Redis refused the credentials for {s.redacted()}: {exc}") from exc
        except TRANSIENT as exc:
            await client.aclose()
            await commands.aclose()
            raise ConnectionLost(f"cannot connect to {s.redacted()}: {self._connect_cause(exc)}") from exc
        except BaseException:
            await client.aclose()
            await commands.aclose()
            raise
        self._client = client
        self._commands = commands
        self._reconnects = reconnects
        self._publisher = RedisPublisher(commands, self.layout, s)
        self._publisher.wait_aof = wait_aof
        if s.retention:
            self._trimmer = Trimmer(client, self.layout, s, self.counters)
            self._trimmer.start()
        logger.info("connected to %s (profile %s)", s.redacted(), s.profile.value)

    def _connect_cause(self, exc: BaseException) -> str:
        # redis-py wraps the socket error in its own ConnectionError; the OSError under it
        # (ConnectionRefusedError, gaierror, ...) says what happened.
        if isinstance(exc.__context__, OSError) and not isinstance(exc, OSError):
            exc = exc.__context__
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"no answer within {self.settings.connect_timeout:g} s"
        return f"{type(exc).__name__}: {exc}"

    async def _check_profile(self, client: aioredis.Redis) -> bool:
        """For the durable profile: True to use WAITAOF; raise if the server cannot be durable."""
        if self.settings.profile is not Profile.DURABLE:
            return False
        info = await call(client, "INFO", "server")
        version = tuple(int(p) for p in str(info.get("redis_version", "0.0.0")).split(".")[:2])
        if version >= (7, 2):
            return True
        try:
            config = await call(client, "CONFIG", "GET", "append*")
        except redis_errors.ResponseError as exc:
            logger.warning("durable profile: cannot read the server's AOF settings (%s); trusting them", exc)
            return False
        values = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                  for k, v in dict(config).items()}
        if values.get("appendonly") != "yes" or values.get("appendfsync") != "always":
            raise ConfigError(
                "profile=durable needs Redis >= 7.2 (WAITAOF) or appendonly yes + appendfsync always; server has "
                f"appendonly={values.get('appendonly')} appendfsync={values.get('appendfsync')}"
            )
        return False

    async def close(self) -> None:
        """Close every subscription, finish publishes in flight, disconnect. Idempotent."""
        if self._closed:
            return
        self._closed = True
        subs, self._subscriptions = list(self._subscriptions), set()
        closing = [sub.close() for sub in subs]
        if self._inboxes is not None:
            closing.append(self._inboxes.close())
        await asyncio.gather(*closing)
        if self._watcher is not None:
            await self._watcher.close()
        if self._trimmer is not None:
            await self._trimmer.close()
        if self._publisher is not None:
            await self._publisher.close()
        if self._client is not None:
            await self._client.aclose()
        if self._commands is not None:
            await self._commands.aclose()

    def _require(self) -> tuple[aioredis.Redis, RedisPublisher]:
        if self._closed or self._client is None or self._publisher is None:
            raise Closed("redis backend is not connected")
        return self._client, self._publisher

    # ---- publish / subscribe -----------------------------------------------------------------

    async def publish(self, message: Message) -> None:
        """Store ``message`` (deduplicated by id within ``dedupe_window``); see RedisPublisher."""
        _, publisher = self._require()
        await publisher.submit([message])

    def enqueue(self, message: Message) -> asyncio.Future[int]:
        """:meth:`publish` without a coroutine of its own: the future to await (``Bus.send`` uses it,
        see ``core.backend.QueuedPublish``)."""
        _, publisher = self._require()
        return publisher.submit([message])

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Store ``messages`` in as few Lua calls as ``publish_batch`` allows (BatchPublisher)."""
        _, publisher = self._require()
        await publisher.publish_many(list(messages))

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> RedisSubscription:
        """Join group ``(group, pattern)`` (created where ``options.start`` says), or read new entries."""
        return await self._start_consumer(pattern, group, options, handler=handler)

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> RedisSubscription:
        """Like :meth:`subscribe`, handing ``handler`` batches of up to ``batch_size`` (BatchSubscriber)."""
        return await self._start_consumer(pattern, group, options, batches=handler, max_wait=max_wait)

    async def _start_consumer(
        self, pattern: str, group: str | None, options: ConsumerOptions, *, handler: RawHandler | None = None,
        batches: BatchRawHandler | None = None, max_wait: float = 0.0,
    ) -> RedisSubscription:
        """Start a group member's or an ephemeral source, then core's consumer runtime over it."""
        subjects.validate_pattern(pattern)
        ctx = self._context()
        source: GroupSource | EphemeralSource
        if group is None:
            source = EphemeralSource(ctx, pattern, options, self._stream_watcher())
        else:
            source = GroupSource(ctx, pattern, group, options)
        sub = RedisSubscription(source, handler=handler, batches=batches, max_wait=max_wait)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await source.start()
        except FAILURES as exc:
            await source.close()
            raise translate(exc, f"subscribe to {pattern!r}") from exc
        sub.start(f"squadbus-redis-{group or 'ephemeral'}")
        self._subscriptions.add(sub)
        sub.on_closed = self._subscriptions.discard
        return sub

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> Subscription:
        """Serve ``agent_id``'s direct messages to ``handler`` through this backend's shared inbox
        connections (MultiplexesInboxes; see :mod:`.inboxes`)."""
        self._require()
        hub = self._inboxes
        if hub is None:
            hub = self._inboxes = InboxHub(self._context(), commands=self._commands)
        return await hub.open(agent_id, handler, group=group, options=options)

    def _context(self) -> ConsumerContext:
        client, _ = self._require()
        reconnects = self._reconnects
        if reconnects is None:  # set together with the client, which _require() checked
            raise Closed("redis backend is not connected")
        return ConsumerContext(client, self.layout, self.settings, self.counters, self.publish, reconnects)

    # ---- Requester ---------------------------------------------------------------------------

    async def request(self, message: Message, *, timeout: float) -> Message:
        """Publish ``message`` with a private ``reply_to`` subject and wait for the first reply there.

        The reply stream is read by the backend's one blocking ``XREAD`` (:mod:`.watcher`), not by a
        connection per waiting request."""
        client, _ = self._require()
        reply_subject = subjects.reply(self._reply_token, str(message.id))
        stream = self.layout.subject_stream(reply_subject)
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def on_entries(_stream: str, entries: list[RawEntry]) -> None:
            for entry in entries:
                if reply.done():
                    return
                try:
                    payload = entry_parts(entry[1] or [])[1]
                    if payload is None:
                        raise MalformedMessage("the entry has no 'm' field")
                    reply.set_result(decode(payload))
                except MalformedMessage as exc:
                    logger.warning("malformed reply to %s ignored: %s", message.id, exc)

        watcher = self._stream_watcher()
        watch = watcher.watch(stream, "0-0", on_entries)
        try:
            async with asyncio.timeout(timeout):
                await self.publish(message.with_headers(reply_to=reply_subject))
                return await reply
        except TimeoutError:
            raise RequestTimeout(f"no reply to {message.id} from {message.recipient_id} within {timeout}s") from None
        finally:
            watcher.unwatch(watch)
            with contextlib.suppress(*FAILURES):  # the reply stream expires after reply_ttl anyway
                await call(self._commands or client, "DEL", stream)

    def _stream_watcher(self) -> StreamWatcher:
        client, _ = self._require()
        if self._watcher is None:
            self._watcher = StreamWatcher(client, self.layout.prefix, self.settings, self.counters,
                                          commands=self._commands)
        return self._watcher

    # ---- Replayable --------------------------------------------------------------------------

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(position, message)`` of one execution still retained, in publish order.

        Scans the execution's partition stream (``XRANGE`` in pages),
        filtering on the entry's execution field; positions are the entry
        ids as integers.
        """
        client, _ = self._require()
        stream = self.layout.partition_stream(task_execution_id.int % self.layout.partitions)
        start = "-"
        if from_seq > 0:
            start = entry_id_of(from_seq)
        if since is not None:
            floor = f"{max(0, int(since.timestamp() * 1000) - _REPLAY_CLOCK_SLACK_MS)}-0"
            if start == "-" or position_of(floor) > from_seq:
                start = floor
        wanted = str(task_execution_id).encode()
        while True:
            try:
                page = await call(client, "XRANGE", stream, start, "+", "COUNT", _REPLAY_PAGE)
            except FAILURES as exc:
                raise translate(exc, f"replay of {task_execution_id}") from exc
            for entry_id, fields in page:
                if fields.get(b"x") != wanted:
                    continue
                try:
                    message = decode(fields[b"m"])
                except (KeyError, MalformedMessage) as exc:
                    logger.warning("replay skipped malformed entry %s/%s: %s", stream, entry_id.decode(), exc)
                    continue
                if since is not None and message.created_at < since:
                    continue
                yield position_of(entry_id), message
            if len(page) < _REPLAY_PAGE:
                return
            start = "(" + page[-1][0].decode()

    def read_all(
        self, pattern: str, *, since: datetime | None = None, on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every retained message matching ``pattern``, up to each partition stream's end at the start
        (ReadsAll); see :mod:`.read_all`."""
        client, _ = self._require()
        subjects.validate_pattern(pattern)
        return read_all(client, self.layout, pattern, since=since, on_unreadable=on_unreadable)

    # ---- introspection -----------------------------------------------------------------------

    async def group_figures(self) -> list[GroupFigures]:
        """Lag, pending and dead letters of every consumer group (DescribesGroups); see :mod:`.group_figures`."""
        client, _ = self._require()
        named = {sub.source.redis_group: sub.source.group_name for sub in self._subscriptions
                 if isinstance(sub.source, GroupSource)}
        return await describe_groups(client, self.layout, named=named)

    async def open_inboxes(self) -> list[InboxPresence]:
        """Agents whose inbox lease is held, by any process (ListsInboxes); see :mod:`.presence`."""
        client, _ = self._require()
        return await list_open_inboxes(client, self.layout)

    def stats(self) -> dict[str, Any]:
        """Counters of this instance: published, duplicates, delivered, claimed, malformed,
        ``trimmed_unacked`` (unacknowledged entries removed by retention or found deleted on claim), ..."""
        publisher = self._publisher
        return {
            "published": publisher.published if publisher else 0,
            "duplicates_dropped": publisher.duplicates if publisher else 0,
            "publish_batches": publisher.batches if publisher else 0,
            "publish_retries": publisher.retries if publisher else 0,
            "subscriptions": len(self._subscriptions),
            "inboxes_open": self._inboxes.open_agents if self._inboxes is not None else 0,
            **{name: getattr(self.counters, name) for name in self.counters.__dataclass_fields__},
        }
