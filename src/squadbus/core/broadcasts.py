"""Squad and domain broadcasts read once per Bus and handed to every open inbox that hears them.

Before this, every inbox held its own subscription (a broker consumer or
connection) per broadcast subject, so a host with N agents paid N squad
subscriptions plus one per domain and agent (issue 15, docs/design/inboxes.md,
"Broadcasts"). The hub holds one subscription per broadcast subject per Bus:

* each broadcast is copied to every open inbox listening on its subject; each
  copy is a delivery of its own (``attempt``, ack, nack with backoff, dead
  letter on ``agent.dlq.inbox-<agent>`` after ``max_deliver``), retried in
  this process for that agent only;
* the Bus's delivery is acked once every copy is settled (acked or dead
  lettered), or given up because its inbox closed. While copies are out its
  lease is extended, so a slow agent does not make the broker redeliver;
* up to ``max_in_flight`` broadcasts are out at once; an agent that stops
  settling holds at most that many.

On a backend whose every subscription reads the whole log and filters on the
client (Kafka: one consumer per subscription, ``literal_subscriptions_cheap =
False`` on the backend class), the hub holds one subscription on
``agent.message.>`` for all its broadcast subjects instead of one per subject,
so a host reads the log once, not once per subject (six times for the squad
and five domains), and acks at once what no inbox of it listens to. Where
such a backend also keeps broadcasts apart (``broadcasts_apart`` true on the
backend: a pattern matching broadcasts only reads a log of broadcasts only,
Kafka's broadcast topic), the hub holds two: ``agent.message.broadcast`` and
``agent.message.domain.>``, and reads no direct message at all (no one
pattern matches both without matching direct messages).

The subscription is ephemeral by default: an inbox hears broadcasts while it
is open. With ``Bus(host_id=...)`` it is the durable group
``inbox-host-<host_id>``: a host restarted with the same id gets the
broadcasts it had not finished, for the agents it opens again.
"""

from __future__ import annotations

import asyncio
import logging
from sys import getrefcount
from typing import TYPE_CHECKING

from squadbus.core import subjects
from squadbus.core.backend import (
    ConsumerOptions,
    Delivery,
    FailurePolicy,
    RawHandler,
    StartFrom,
    Subscription,
    leases_kept,
    settles_itself,
)
from squadbus.core.envelope import Message
from squadbus.core.inbox import Wakeups

if TYPE_CHECKING:
    from squadbus.core.bus import Bus
    from squadbus.core.inbox import Inbox

logger = logging.getLogger("squadbus.inbox")

HOST_GROUP_PREFIX = "inbox-host-"
ONE_READ = f"{subjects.MESSAGE_PREFIX}.>"
"""The one pattern a hub subscribes to where literal subscriptions are not cheap."""
DOMAINS_READ = f"{subjects.DOMAIN_PREFIX}.>"
"""The pattern carrying every domain broadcast where broadcasts are kept apart."""


class _Copy(Delivery):
    """One inbox's copy of a broadcast: settled here, in process; a nack asks for a local redelivery.

    Its settlement is reported to the hub inline (no future or callback per copy: a squad
    broadcast to 2,500 inboxes of a host is 2,500 of these at once)."""

    __slots__ = ("_fanout", "_inbox", "delay")

    def __init__(self, message: Message, attempt: int, inbox: Inbox, fanout: _Fanout,
                 on_failure: FailurePolicy) -> None:
        # Delivery.__init__ inlined, and only what every copy needs stored: one of these per inbox per
        # broadcast (the group and gap_before are read from the class; delay is set by a nack).
        self.message = message
        self.attempt = attempt
        self._settled = None
        self._waiter = None
        self._on_failure = on_failure
        self._fanout = fanout
        self._inbox = inbox

    @property
    def group(self) -> str:  # type: ignore[override]  # Delivery's slot, read through the inbox: a store less
        return self._inbox._group

    @property
    def gap_before(self) -> int:  # type: ignore[override]  # a copy never follows a gap
        return 0

    def _ack(self) -> None:
        self._fanout.finish_one()  # what the hub's _settled does for an ack, one call less per copy

    def _nack(self, delay: float) -> None:
        self.delay = delay
        self._fanout.hub._settled(self)

    def _term(self) -> None:
        self._fanout.hub._settled(self)


class _Fanout:
    """One broadcast being copied to a Bus's inboxes: ``done`` once every copy is settled or given up."""

    __slots__ = ("done", "hub", "left", "subject")

    def __init__(self, hub: BroadcastHub, subject: str, count: int) -> None:
        self.hub = hub
        self.subject = subject
        self.left = count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish_one(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)

    def finish(self, count: int) -> None:
        """``count`` copies settled at once (none: nothing changes)."""
        if count:
            self.left -= count
            if self.left == 0 and not self.done.done():
                self.done.set_result(None)


class BroadcastHub:
    """The broadcast subscriptions of one Bus, shared by its inboxes.

    Copies are put straight into the inboxes' queues and followed by a callback
    on their settlement (no task per copy: a squad broadcast to 10,000 inboxes
    is 10,000 small objects, not 10,000 tasks).
    """

    def __init__(self, bus: Bus, *, group: str | None, max_in_flight: int = 256) -> None:
        self._bus = bus
        self.group = group
        self._max_in_flight = max_in_flight
        self._listeners: dict[str, dict[Inbox, FailurePolicy]] = {}
        self._subs: dict[str, Subscription] = {}
        self._lock = asyncio.Lock()

    @property
    def subscriptions(self) -> int:
        """Broadcast subscriptions held now (one per subject some open inbox listens on)."""
        return len(self._subs)

    def _key(self, subject: str) -> str:
        """The subscription that carries ``subject``: its own, the domains' one read of ``DOMAINS_READ``
        where broadcasts are kept apart, or the one read of ``ONE_READ`` (module docstring)."""
        backend = self._bus.backend
        if getattr(backend, "literal_subscriptions_cheap", True):
            return subject
        if getattr(backend, "broadcasts_apart", False) and subjects.is_broadcast(subject):
            return subject if subject == subjects.BROADCAST else DOMAINS_READ
        return ONE_READ

    async def join(self, subject: str, inbox: Inbox, on_failure: FailurePolicy) -> None:
        """Copy the broadcasts on ``subject`` to ``inbox``; a failed copy is settled by ``on_failure``."""
        async with self._lock:
            self._listeners.setdefault(subject, {})[inbox] = on_failure
            key = self._key(subject)
            if key in self._subs:
                return
            base = self._bus.consumer_options
            options = ConsumerOptions(start=StartFrom.NEW, max_in_flight=self._max_in_flight,
                                      max_pending=max(base.max_pending, self._max_in_flight),
                                      ack_wait=base.ack_wait)
            try:
                self._subs[key] = await self._bus.backend.subscribe(
                    key, self._fan_out(), group=self.group, options=options)
            except BaseException:
                self._listeners[subject].pop(inbox, None)
                raise

    async def leave(self, subject: str, inbox: Inbox) -> None:
        """Stop copying ``subject`` to ``inbox``; the last one out closes the subscription."""
        async with self._lock:
            listeners = self._listeners.get(subject, {})
            listeners.pop(inbox, None)
            if listeners:
                return
            self._listeners.pop(subject, None)
            key = self._key(subject)
            if key != subject and any(self._key(other) == key for other in self._listeners):
                return  # the shared read still carries other subjects
            sub = self._subs.pop(key, None)
        if sub is not None:
            await sub.close()

    async def close(self) -> None:
        """Close every broadcast subscription (after the inboxes closed; idempotent)."""
        async with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
            self._listeners.clear()
        await asyncio.gather(*(sub.close() for sub in subs))

    def _fan_out(self) -> RawHandler:
        async def fan_out(delivery: Delivery) -> None:
            try:
                subject = delivery.message.subject
                # A copy of the listeners, iterated with items(): no (inbox, policy) tuple per inbox (a list of
                # items() was 10,000 tracked tuples per squad broadcast, each one more for the collector).
                targets = dict(self._listeners.get(subject, {}))
                if targets:
                    fanout = _Fanout(self, subject, len(targets))
                    wakeups = Wakeups(asyncio.get_running_loop())
                    message, attempt = delivery.message, delivery.attempt
                    stats = self._bus.stats
                    stats.delivered += len(targets)
                    if attempt > 1:
                        stats.redelivered += len(targets)
                    acked = 0  # copies a handler acked by returning, counted down together after the loop
                    spare: _Copy | None = None  # a copy its handler returned without keeping: the next one
                    try:
                        for inbox, on_failure in targets.items():  # _offer inlined: once per inbox per broadcast
                            handler = inbox._inline
                            if handler is None:  # an agent's loop or the inbox's task takes it from its queue
                                if not inbox.offer(_Copy(message, attempt, inbox, fanout, on_failure), wakeups):
                                    fanout.finish_one()
                                continue
                            # A plain-function handler, called here (what Inbox.offer would do, three calls less
                            # per copy: 10,000 agents hear a squad broadcast, bench/bench_fanout.py).
                            if not inbox._open:
                                fanout.finish_one()
                                continue
                            if spare is None:
                                copy = _Copy(message, attempt, inbox, fanout, on_failure)
                            else:
                                copy, spare = spare, None
                                copy._inbox, copy._on_failure, copy._settled = inbox, on_failure, None
                            try:
                                returned = handler(copy)
                            except Exception as exc:
                                inbox._settle_later(copy.fail(exc))
                                continue
                            if returned is None and copy._settled is None and copy._waiter is None:
                                acked += 1  # nobody waits on it: counted, not reported one by one
                                if getrefcount(copy) == 2:  # only here (and the call's argument): reused
                                    spare = copy
                                else:
                                    copy._settled = "ack"
                            else:
                                inbox._returned(copy, returned)
                    finally:
                        fanout.finish(acked)
                        wakeups.flush()  # the agents given a copy are woken whatever happens to the rest
                    async with leases_kept([delivery], max(0.05, self._bus.consumer_options.ack_wait / 3)):
                        await asyncio.wait({fanout.done})
                await delivery.ack()
            except asyncio.CancelledError:
                if delivery.settled is None:
                    await delivery.nack()
                raise
            except Exception:
                logger.exception("fanning out broadcast %s failed", delivery.message.id)
                if delivery.settled is None:
                    await delivery.nack(self._bus.consumer_options.backoff(delivery.attempt))

        return settles_itself(fan_out)

    def _offer(self, fanout: _Fanout, message: Message, attempt: int, inbox: Inbox, on_failure: FailurePolicy) -> None:
        """Put a copy in ``inbox``'s queue; it reports its settlement to :meth:`_settled`."""
        copy = _Copy(message, attempt, inbox, fanout, on_failure)
        stats = self._bus.stats
        stats.delivered += 1
        if attempt > 1:
            stats.redelivered += 1
        if not inbox.offer(copy):
            fanout.finish_one()

    def _settled(self, copy: _Copy) -> None:
        fanout = copy._fanout
        if copy.settled == "nack" and self._listening(fanout.subject, copy._inbox, copy._on_failure):
            loop = asyncio.get_running_loop()
            loop.call_later(copy.delay, self._retry, copy)
            return
        fanout.finish_one()

    def _retry(self, copy: _Copy) -> None:
        fanout, inbox, on_failure = copy._fanout, copy._inbox, copy._on_failure
        if on_failure is not None and self._listening(fanout.subject, inbox, on_failure):
            self._offer(fanout, copy.message, copy.attempt + 1, inbox, on_failure)
        else:
            fanout.finish_one()

    def _listening(self, subject: str, inbox: Inbox, on_failure: FailurePolicy | None) -> bool:
        return inbox.is_open and self._listeners.get(subject, {}).get(inbox) is on_failure
