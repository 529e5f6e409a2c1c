"""Agents' inboxes on RabbitMQ (``MultiplexesInboxes``): one channel per Bus, no task per agent.

An agent's direct messages wait in its own quorum queue ``<namespace>.inbox.<agent>`` (bound to
its direct subject, created at the first open with the log's backlog copied in, as a group's), so
messages sent before the first open wait for it and a killed host's unacknowledged deliveries come
back (``x-delivery-count`` + 1) to whichever process opens the agent next. The queue is declared
with ``x-single-active-consumer``: a second open of the agent, in this Bus or another process, is a
standby consumer that gets nothing until the first closes or its connection dies, then takes over.

Per Bus, every open inbox is a consumer on one shared channel (``basic.qos`` prefetch 1 per
consumer: an agent holds one delivery at a time, in queue order); a delivery runs the agent's
handler in a task of its own that ends when the handler returns, so an idle open inbox costs no
task and no channel. What stays per agent on the broker: the quorum queue (~180 KiB of node memory
measured) and a consumer record while open (docs/design/inboxes.md, RabbitMQ).

Inbox queues of the earlier layout (``<namespace>.group.inbox-<agent>-<hash>``, one channel each)
are not read: what an agent had left there stays there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import aio_pika.abc

from squadbus.backends.rabbitmq.subscriber import IncomingMessage, RabbitSubscription
from squadbus.backends.rabbitmq.topology import inbox_queue_arguments
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, RawHandler, invoke

if TYPE_CHECKING:
    from squadbus.backends.rabbitmq.backend import RabbitBackend


class InboxChannel:
    """The Bus's one channel for every inbox consumer, and the queue objects declared on it."""

    def __init__(self, backend: RabbitBackend) -> None:
        self._backend = backend
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        # One queue object per agent, reused by its next opens: the robust channel keeps every queue
        # declared on it (to restore after a reconnect), so a new one per open would pile up.
        self._queues: dict[str, aio_pika.abc.AbstractQueue] = {}

    async def queue(self, name: str) -> aio_pika.abc.AbstractQueue:
        """The inbox queue ``name`` declared on the shared channel (opened on first use)."""
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                channel = await self._backend.connection.channel()
                await channel.set_qos(prefetch_count=1)
                self._channel, self._queues = channel, {}
            queue = self._queues.get(name)
            if queue is None:
                classic = self._backend.settings.classic_queues
                queue = await self._channel.declare_queue(
                    name, durable=True, arguments=inbox_queue_arguments(classic=classic))
                self._queues[name] = queue
            return queue

    async def close(self) -> None:
        """Close the channel (idempotent)."""
        channel, self._channel = self._channel, None
        self._queues = {}
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5 if self._backend.connected else 0.5):
                    await channel.close()


class InboxSubscription(RabbitSubscription):
    """One open of an agent's inbox: a consumer on the Bus's inbox channel, a task only per delivery."""

    def __init__(self, backend: RabbitBackend, shared: InboxChannel, agent_id: str, queue_name: str,
                 handler: RawHandler, group: str, options: ConsumerOptions) -> None:
        super().__init__(backend, pattern=subjects.direct(agent_id), group=group, queue_name=queue_name,
                         handler=handler, options=options)
        self._shared = shared
        self.agent_id = agent_id
        self._watched = False  # no ack_wait give-back: closing the channel would close every inbox of the Bus
        # The attempt of each delivery held here (unacknowledged on the broker), for its local redelivery.
        self._held: dict[IncomingMessage, int] = {}

    async def start(self) -> None:
        """Consume the agent's queue on the shared channel (a standby while another consumer holds it)."""
        assert self._queue_name is not None
        queue = self._queue = await self._shared.queue(self._queue_name)
        self._tag = await queue.consume(self._on_message)

    async def _on_message(self, msg: IncomingMessage) -> None:
        if self._closing:
            await self.send(msg, ack=False)
            return
        self._spawn(self._handle_one(msg))

    async def _handle_one(self, msg: IncomingMessage) -> None:
        delivery = await self._delivery_of(msg)
        if delivery is not None:
            await invoke(self._handler, delivery, self._options)

    def _attempt(self, msg: IncomingMessage) -> int:
        held = self._held.get(msg)
        attempt = held + 1 if held is not None else super()._attempt(msg)
        self._held[msg] = attempt
        return attempt

    def requeue(self, msg: IncomingMessage, delay: float) -> Awaitable[None] | None:
        """Hand ``msg`` to the agent again after ``delay``, from this process: it stays unacknowledged
        on the broker meanwhile, so (prefetch 1) nothing later of the agent's comes first. A 3.10
        quorum queue would put a requeued message behind the ones already queued. Closing, or a
        channel that is gone, gives it back to the broker instead (as before)."""
        if self._closing or msg.channel.is_closed:
            return self.send(msg, ack=False)
        self._later[msg] = asyncio.get_running_loop().call_later(delay, self._redeliver, msg)
        return None

    def _redeliver(self, msg: IncomingMessage) -> None:
        if self._later.pop(msg, None) is None:
            return  # close() gave it back meanwhile
        if self._closing:
            self._spawn(self.send(msg, ack=False))
        elif msg.channel.is_closed:
            self._held.pop(msg, None)  # the broker requeued it with the channel
        else:
            self._spawn(self._handle_one(msg))

    async def send(self, msg: IncomingMessage, *, ack: bool) -> None:
        """Ack (or give back to the broker) ``msg`` now; it is no longer held here."""
        self._held.pop(msg, None)
        await super().send(msg, ack=ack)
