"""Agents' inboxes on RabbitMQ (``MultiplexesInboxes``, ``PlacesInboxes``): partition queues, one channel per Bus.

Broker cost per squad: ``inbox_partitions`` queues (``<namespace>.inboxes.<p>``, quorum, classic under
``profile=fast``, each with ``x-single-active-consumer``), however many agents there are. Per Bus that
opens inboxes: one channel and one consumer per partition it reads. Per agent: nothing on the broker.

* **Routing.** The publisher routes a direct message to ``agent.message.<agent>`` also to the partition
  ``crc32(agent) % inbox_partitions`` (``CC`` routing key ``_inbox.<p>``, :mod:`.publisher`); the confirm
  covers the partition queue. Queues are created by the first Bus that opens an inbox, with what the log
  holds for their agents copied in (:mod:`.backlog`), so messages sent before any inbox opened wait
  (within the log's retention, the queues' message TTL).
* **One active reader per partition.** ``x-single-active-consumer``: the first Bus consuming a partition
  reads it; another Bus consuming it is a standby and takes over when the first closes or dies. A Bus
  with ``inbox_hosts`` reads the partitions ``p % inbox_hosts == inbox_host`` from its first open on (a
  deployment places agents by partition, :mod:`.placement`, as on Kafka); without it, the partition of
  each agent it opens, from that open on (so hosts placing agents by ``crc32(agent) % hosts``, with
  ``hosts`` dividing ``inbox_partitions``, read disjoint partitions).
* **Demultiplexing.** The broker hands a Bus up to ``inbox_prefetch`` unacknowledged messages per
  partition; each goes to its agent's queue and the agent gets one delivery at a time, in order. A
  nacked or failed delivery stays unacknowledged and is handed to the agent again by this Bus after its
  delay (a 3.10 quorum queue would requeue it *behind* the agent's later messages), attempt + 1.
* **Agents not open here.** Their messages are held, unacknowledged, in memory, and handed over in order
  when the agent opens. They use the partition's prefetch: a partition whose ``inbox_prefetch`` messages
  all wait for agents not open gets nothing more from the broker until those agents open (logged once).
  A message held ``inbox_unclaimed`` seconds is acknowledged undelivered (logged: it is still in the log
  and the store), so one agent that never opens cannot stall its partition for ever.
* **Close and crash.** Closing the Bus closes its inbox channel: the broker puts every unacknowledged
  message back at the head of its partition, in order, ``x-delivery-count`` + 1 (so a message held for
  an agent that never opened also counts an attempt), and the standby Bus, or the next one to consume,
  gets them. A ``kill -9`` does the same when the connection drops.
* **Two opens** of an agent in one Bus: the first holder is served, the next takes over when it closes.
  In two processes: the Bus that reads the agent's partition serves it; the other waits for it.

Queues of the earlier layouts (``<namespace>.inbox.<agent>``, ``<namespace>.group.inbox-<agent>-<hash>``)
are not read: what an agent had left there stays there (docs/design/inboxes.md, RabbitMQ).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import aio_pika.abc

from squadbus.backends.rabbitmq.group_figures import registered_groups
from squadbus.backends.rabbitmq.subscriber import (
    UNSETTLED_MARGIN,
    IncomingMessage,
    malformed_dead_letter,
    settle,
)
from squadbus.backends.rabbitmq.topology import (
    ORIGINAL_KEY_HEADER,
    direct_recipient,
    inbox_partition,
    inbox_route,
)
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, RawHandler, invoke
from squadbus.core.dispatch import dead_letter_of
from squadbus.core.envelope import Message, decode
from squadbus.core.errors import Closed, MalformedMessage, SquadbusError
from squadbus.core.inbox_source import INBOX_GROUP_PREFIX, InboxHolder
from squadbus.core.placement import InboxPlacement
from squadbus.core.tasks import cancel_and_wait

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend

logger = logging.getLogger("squadbus.backends.rabbitmq")

_DIRECT_PATTERN = subjects.direct("x")[:-1] + "*"


class _Partition:
    """A partition this Bus consumes: the messages it holds for agents not open here."""

    __slots__ = ("full_warned", "held", "index", "unclaimed")

    def __init__(self, index: int) -> None:
        self.index = index
        self.unclaimed: dict[str, deque[tuple[IncomingMessage, float]]] = {}  # agent -> (msg, since)
        self.held = 0
        self.full_warned = False


class _Agent:
    """An open agent: its holders (the first is served) and its queue of messages."""

    __slots__ = ("blocked_until", "busy", "holders", "id", "partition", "queue", "subject")

    def __init__(self, agent_id: str, partition: int) -> None:
        self.id = agent_id
        self.subject = subjects.direct(agent_id)
        self.partition = partition
        self.holders: list[InboxHolder[_Agent]] = []
        self.queue: deque[IncomingMessage] = deque()
        self.busy = False
        self.blocked_until = 0.0


class RabbitInboxDelivery(Delivery):
    """One partition message handed to an agent; ack sends ``basic.ack``, a nack keeps it here for later."""

    __slots__ = ("_agent_id", "_hub", "_msg")

    def __init__(self, message: Message, attempt: int, group: str, hub: RabbitInboxHub, agent_id: str,
                 msg: IncomingMessage) -> None:
        super().__init__(message, attempt=attempt, group=group)
        self._hub, self._agent_id, self._msg = hub, agent_id, msg

    def _ack(self) -> Awaitable[None]:
        return self._hub.send(self._msg, ack=True)

    def _nack(self, delay: float) -> None:
        self._hub.retry(self._agent_id, self._msg, delay, self.attempt)


def _group_reader_of(group: str, pattern: str) -> str | None:
    """The agent whose direct subject exactly the group ``group`` reads with ``pattern``, else None (wildcard
    patterns such as the db-writer's ``agent.>`` read everything; ``inbox-`` groups are earlier inboxes)."""
    if group.startswith(INBOX_GROUP_PREFIX) or "*" in pattern or ">" in pattern:
        return None
    return direct_recipient(pattern)


class RabbitInboxHub:
    """Every open inbox of one Bus, served from the partition queues it reads (see the module docstring)."""

    def __init__(self, backend: RabbitBackend) -> None:
        self._backend = backend
        self._settings = backend.settings
        self._agents: dict[str, _Agent] = {}
        self._parts: dict[int, _Partition] = {}
        self._attempts: dict[IncomingMessage, int] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._starting = asyncio.Lock()
        self._handling: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._grouped: frozenset[str] = frozenset()
        """Agents whose direct subject a group subscription reads, in any process (the group registry)."""
        self._regrouping: asyncio.Task[None] | None = None
        self._closed = False
        self.created = 0
        """Partition queues this hub created (0 when they existed)."""

    @property
    def consumers(self) -> int:
        """Broker consumers this hub holds: one per partition it reads (its slot's with ``inbox_hosts``,
        else those of the agents it opened)."""
        return len(self._parts) if self._channel is not None and not self._closed else 0

    def partition_of(self, agent_id: str) -> int:
        """The inbox partition of ``agent_id``."""
        return inbox_partition(agent_id, self._settings.inbox_partitions)

    def placement(self) -> InboxPlacement:
        """The partitions this Bus reads (``inbox_hosts`` / ``inbox_host``), and the agents' partitions."""
        if self._closed:
            raise Closed("rabbitmq backend is closed")
        return InboxPlacement(partitions=self._settings.inbox_partitions,
                              owned=self._settings.owned_inbox_partitions, partition_of=self.partition_of)

    # ---- opening and closing inboxes ---------------------------------------------------------

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> InboxHolder[_Agent]:
        """Serve ``agent_id``'s inbox to ``handler`` (see ``MultiplexesInboxes.open_inbox``)."""
        if self._closed:
            raise Closed("rabbitmq backend is closed")
        subjects.direct(agent_id)  # refuses a bad or reserved id before anything is created
        await self._start()
        partition = self.partition_of(agent_id)
        await self._read(partition)
        agent = self._agents.get(agent_id)
        if agent is None:
            agent = self._agents[agent_id] = _Agent(agent_id, partition)
        holder = InboxHolder(self, agent, handler, group, options)
        agent.holders.append(holder)
        if len(agent.holders) == 1:
            self._claim(agent)
        return holder

    async def close_holder(self, holder: InboxHolder[_Agent]) -> None:
        """Close one open of an agent; the last one out keeps its queued messages held here (unclaimed)."""
        if not holder.leave():
            return
        agent = holder.agent
        if agent.holders:
            self._kick(agent)
            return
        if self._agents.get(agent.id) is agent:
            del self._agents[agent.id]
        queued, agent.queue = agent.queue, deque()
        for msg in reversed(queued):
            self._unclaim(agent.id, msg, front=True)

    def _claim(self, agent: _Agent) -> None:
        """The agent opened here: what its partition held for it is its, in order."""
        part = self._parts.get(agent.partition)
        held = part.unclaimed.pop(agent.id, None) if part is not None else None
        if part is None or not held:
            return
        part.held -= len(held)
        agent.queue.extend(msg for msg, _ in held if not msg.channel.is_closed)
        self._kick(agent)

    def _unclaim(self, agent_id: str, msg: IncomingMessage, *, front: bool = False) -> None:
        part = self._parts.get(self.partition_of(agent_id))
        if part is None or msg.channel.is_closed:
            return  # the broker has it again (channel gone) or it is not this Bus's (cannot happen)
        held = part.unclaimed.setdefault(agent_id, deque())
        entry = (msg, time.monotonic())
        if front:
            held.appendleft(entry)
        else:
            held.append(entry)
        part.held += 1
        if part.held >= self._settings.inbox_prefetch and (self._regrouping is None or self._regrouping.done()):
            # Full: maybe with messages of agents another process reads by a group (not held for them).
            self._regrouping = asyncio.get_running_loop().create_task(self._release_grouped())
        if part.held >= self._settings.inbox_prefetch and not part.full_warned:
            part.full_warned = True
            logger.warning(
                "inbox partition %d: %d messages wait for agents not open on this Bus (inbox_prefetch); the broker "
                "hands this partition nothing more until they open (open every agent this host places, or they are "
                "acked undelivered after inbox_unclaimed=%gs)", part.index, part.held, self._settings.inbox_unclaimed)

    # ---- the channel and its consumers -------------------------------------------------------

    async def _start(self) -> None:
        if self._channel is not None:
            return
        async with self._starting:
            if self._channel is not None:
                return
            if self._closed:
                raise Closed("rabbitmq backend is closed")
            await self._ensure_queues()
            s = self._settings
            channel = await self._backend.connection.channel()
            try:
                await channel.set_qos(prefetch_count=s.inbox_prefetch)
                if s.inbox_hosts:  # a placed host reads its slot's partitions from its first open on
                    for index in sorted(s.owned_inbox_partitions):
                        await self._consume(channel, index)
            except BaseException:
                self._parts.clear()
                with contextlib.suppress(Exception):
                    await channel.close()
                raise
            self._channel = channel
            every = min(60.0, s.inbox_unclaimed / 10)
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(every), name="squadbus-rabbitmq-inbox-sweep")

    async def _consume(self, channel: aio_pika.abc.AbstractChannel, index: int) -> None:
        part = _Partition(index)
        queue = await self._backend.declare_group_queue(channel, self._settings.inbox_partition_queue(index),
                                                        inbox=True)
        await queue.consume(functools.partial(self._on_message, part))
        self._parts[index] = part

    async def _read(self, index: int) -> None:
        """Without ``inbox_hosts``: consume partition ``index`` when the first agent of it opens here."""
        if index in self._parts or self._settings.inbox_hosts:
            return
        async with self._starting:
            channel = self._channel
            if index in self._parts or channel is None or self._closed:
                return
            await self._consume(channel, index)

    async def _ensure_queues(self) -> None:
        """Create the partition queues that do not exist yet, bound to their route, with the log's backlog,
        under the squad's setup lock: other processes opening inboxes now neither create nor fill them a
        second time, nor consume one before it is complete (see :mod:`.backend`)."""
        async with self._backend.setup_lock():
            await self._create_missing_queues()

    async def _create_missing_queues(self) -> None:
        backend, s = self._backend, self._settings
        names = {p: s.inbox_partition_queue(p) for p in range(s.inbox_partitions)}
        found = await backend.ready_counts(list(names.values()))
        missing = [p for p, name in names.items() if found[name] is None]
        if not missing:
            return

        async def create(partition: int) -> None:
            channel = await backend.connection.channel()
            try:
                queue = await backend.declare_group_queue(channel, names[partition], inbox=True)
                await queue.bind(s.exchange, inbox_route(partition))
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()

        await asyncio.gather(*(create(p) for p in missing))
        partitions = s.inbox_partitions

        def accept(partition: int, key: str) -> bool:
            agent = direct_recipient(key)
            return agent is not None and inbox_partition(agent, partitions) == partition

        try:
            copied = await asyncio.gather(*(
                backend.copy_backlog(names[p], _DIRECT_PATTERN, functools.partial(accept, p)) for p in missing))
        except BaseException:
            # Without its backlog a queue must not stay: the next Bus would find it and copy nothing.
            for p in missing:
                await backend.delete_queue(names[p])
            raise
        self.created += len(missing)
        logger.info("created %d inbox partition queues with %d messages from the log", len(missing), sum(copied))

    async def _on_message(self, part: _Partition, msg: IncomingMessage) -> None:
        if self._closed:
            return  # the channel closes: the broker gets it back with it
        headers = msg.headers or {}
        key = str(headers.get(ORIGINAL_KEY_HEADER) or msg.routing_key or "")
        agent_id = direct_recipient(key)
        if agent_id is None:
            logger.warning("inbox partition %d: a message routed with %r is not a direct message; dropped",
                           part.index, key)
            await self.send(msg, ack=True)
            return
        agent = self._agents.get(agent_id)
        if agent is None or not agent.holders:
            if self._read_by_a_group(agent_id):
                await self.send(msg, ack=True)  # its group's queue has its own copy
                return
            self._unclaim(agent_id, msg)
            return
        agent.queue.append(msg)
        self._kick(agent)

    # ---- handing messages to agents ----------------------------------------------------------

    def _kick(self, agent: _Agent) -> None:
        if agent.busy or not agent.queue or not agent.holders or self._closed:
            return
        agent.busy = True
        task = asyncio.get_running_loop().create_task(self._serve(agent))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _serve(self, agent: _Agent) -> None:
        loop = asyncio.get_running_loop()
        try:
            while agent.queue and agent.holders and not self._closed:
                wait = agent.blocked_until - loop.time()
                if wait > 0:
                    loop.call_later(wait, self._kick, agent)
                    return
                msg = agent.queue.popleft()
                if msg.channel.is_closed:
                    self._attempts.pop(msg, None)
                    continue  # the broker has it again (reconnect): it comes back on the new channel
                await self._deliver(agent.holders[0], msg)
        finally:
            agent.busy = False

    def _attempt(self, msg: IncomingMessage) -> int:
        made = self._attempts.pop(msg, None)
        if made is not None:
            return made + 1
        if self._settings.classic_queues:  # no delivery count: another consumer had it, how often unknown
            return 2 if msg.redelivered else 1
        count = (msg.headers or {}).get("x-delivery-count", 0)
        return (count if isinstance(count, int) else 0) + 1

    async def _deliver(self, holder: InboxHolder[_Agent], msg: IncomingMessage) -> None:
        attempt = self._attempt(msg)
        agent_id = holder.agent.id
        try:
            message = decode(msg.body)
        except MalformedMessage as exc:
            key = str((msg.headers or {}).get(ORIGINAL_KEY_HEADER) or msg.routing_key or "")
            queue = self._settings.inbox_partition_queue(holder.agent.partition)
            await self._dead_letter(holder, msg, malformed_dead_letter(msg, holder.group, attempt, exc, key, queue),
                                    attempt, f"malformed: {exc}")
            return
        delivery = RabbitInboxDelivery(message, attempt, holder.group, self, agent_id, msg)
        options = holder.options
        if attempt > options.max_deliver + UNSETTLED_MARGIN:
            reason = (f"delivered {attempt - 1} times without being settled (hosts crashed or closed holding it); "
                      f"max_deliver {options.max_deliver} + {UNSETTLED_MARGIN}")
            await self._dead_letter(holder, msg, dead_letter_of(delivery, reason), attempt, reason)
            return
        await invoke(holder.handler, delivery, options)

    async def _dead_letter(self, holder: InboxHolder[_Agent], msg: IncomingMessage, dead: Message, attempt: int,
                           reason: str) -> None:
        try:
            await self._backend.publish(dead)
        except SquadbusError:
            logger.exception("could not dead-letter a message of inbox %s; will retry", holder.agent.id)
            self.retry(holder.agent.id, msg, holder.options.backoff(attempt), attempt)
            return
        logger.warning("dead-lettered a message of inbox %s: %s", holder.agent.id, reason)
        await self.send(msg, ack=True)

    # ---- settling ----------------------------------------------------------------------------

    async def send(self, msg: IncomingMessage, *, ack: bool) -> None:
        """Ack (``ack``) or requeue ``msg`` now; a failure only means the broker redelivers it."""
        self._attempts.pop(msg, None)
        await settle(msg, ack=ack, what="inbox message")

    def retry(self, agent_id: str, msg: IncomingMessage, delay: float, attempt: int) -> None:
        """Hand ``msg`` (attempt ``attempt`` was made) to its agent again after ``delay``, before its later
        messages; it stays unacknowledged meanwhile. Closing or a lost channel: the broker has it again."""
        if self._closed or msg.channel.is_closed:
            return
        self._attempts[msg] = attempt
        agent = self._agents.get(agent_id)
        if agent is None or not agent.holders:
            self._unclaim(agent_id, msg, front=True)
            return
        agent.queue.appendleft(msg)
        agent.blocked_until = asyncio.get_running_loop().time() + delay
        self._kick(agent)

    # ---- unclaimed messages ------------------------------------------------------------------

    async def _sweep(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                if any(part.held for part in self._parts.values()):
                    await self._release_grouped()
                await self._release_unclaimed()
            except Exception:  # the sweep must go on
                logger.exception("releasing unclaimed inbox messages failed")

    def _read_by_a_group(self, agent_id: str) -> bool:
        """True when a group subscription (not an inbox) reads ``agent_id``'s direct subject: such an agent
        takes its direct messages from that group's queue, so its partition copies are not kept for an inbox."""
        return agent_id in self._grouped or agent_id in self._local_readers()

    def _local_readers(self) -> set[str]:
        """The agents this Bus's own group subscriptions read by their direct subject (known at once,
        before the registry is read)."""
        return {agent for _, group, pattern in self._backend.local_groups()
                if (agent := _group_reader_of(group, pattern)) is not None}

    async def _release_grouped(self) -> None:
        """Learn, from the group registry, which agents groups read by their direct subject (in any process),
        and ack what this hub holds for them."""
        try:
            groups = await registered_groups(self._backend)
        except Exception as exc:  # the registry is a hint: holding goes on, unclaimed messages age out
            logger.warning("could not read the group registry %s: %s", self._settings.registry_queue, exc)
            return
        self._grouped = frozenset(
            agent for group, pattern in groups.values() if (agent := _group_reader_of(group, pattern)) is not None)
        readers = self._grouped | self._local_readers()
        for part in self._parts.values():
            for agent_id in [a for a in part.unclaimed if a in readers]:
                held = part.unclaimed.pop(agent_id)
                part.held -= len(held)
                for msg, _ in held:
                    if not msg.channel.is_closed:
                        await self.send(msg, ack=True)
            if part.held < self._settings.inbox_prefetch:
                part.full_warned = False

    async def _release_unclaimed(self) -> None:
        """Ack messages held longer than ``inbox_unclaimed`` for agents not open here (logged); forget
        those whose channel is gone (the broker has them again)."""
        cutoff = time.monotonic() - self._settings.inbox_unclaimed
        for stale in [m for m in self._attempts if m.channel.is_closed]:
            del self._attempts[stale]
        for part in self._parts.values():
            released = 0
            for agent_id in list(part.unclaimed):
                held = part.unclaimed[agent_id]
                kept: deque[tuple[IncomingMessage, float]] = deque()
                for msg, since in held:
                    if msg.channel.is_closed:
                        continue
                    if since < cutoff:
                        released += 1
                        await self.send(msg, ack=True)
                    else:
                        kept.append((msg, since))
                part.held -= len(held) - len(kept)
                if kept:
                    part.unclaimed[agent_id] = kept
                else:
                    del part.unclaimed[agent_id]
            if part.held < self._settings.inbox_prefetch:
                part.full_warned = False
            if released:
                logger.warning(
                    "inbox partition %d: acked %d messages undelivered: their agents did not open an inbox on this "
                    "Bus within inbox_unclaimed=%gs (the log and the store keep them)",
                    part.index, released, self._settings.inbox_unclaimed)

    # ---- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop handing out, then close the channel: the broker puts everything unacknowledged back at
        the head of its partition, for the standby or the next Bus. Idempotent. Cancelled while its handlers
        end, it still closes the channel, then raises CancelledError."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._handling, *(t for t in (self._sweeper, self._regrouping) if t is not None)]
        try:
            # A handler cancelled while unsettled nacks its delivery: a no-op once closed.
            await cancel_and_wait(*tasks)
        finally:
            await self._close_channel()

    async def _close_channel(self) -> None:
        """close()'s clean-up once the handlers ended: forget the partitions, close the channel."""
        self._agents.clear()
        self._parts.clear()
        self._attempts.clear()
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5 if self._backend.connected else 0.5):
                    await channel.close()
