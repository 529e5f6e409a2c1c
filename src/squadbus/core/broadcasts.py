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

The subscription is ephemeral by default: an inbox hears broadcasts while it
is open. With ``Bus(host_id=...)`` it is the durable group
``inbox-host-<host_id>``: a host restarted with the same id gets the
broadcasts it had not finished, for the agents it opens again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from squadbus.core.backend import ConsumerOptions, Delivery, RawHandler, StartFrom, Subscription, settles_itself
from squadbus.core.envelope import Message

if TYPE_CHECKING:
    from squadbus.core.bus import Bus
    from squadbus.core.inbox import Inbox

logger = logging.getLogger("squadbus.inbox")

HOST_GROUP_PREFIX = "inbox-host-"


class _Copy(Delivery):
    """One inbox's copy of a broadcast: settled here, in process; a nack asks for a local redelivery."""

    __slots__ = ("delay",)

    def __init__(self, message: Message, *, attempt: int, group: str) -> None:
        super().__init__(message, attempt=attempt, group=group)
        self.delay = 0.0

    def _ack(self) -> None:
        return None

    def _nack(self, delay: float) -> None:
        self.delay = delay

    def _term(self) -> None:
        return None


class BroadcastHub:
    """The broadcast subscriptions of one Bus, shared by its inboxes."""

    def __init__(self, bus: Bus, *, group: str | None, max_in_flight: int = 256) -> None:
        self._bus = bus
        self.group = group
        self._max_in_flight = max_in_flight
        self._listeners: dict[str, dict[Inbox, RawHandler]] = {}
        self._subs: dict[str, Subscription] = {}
        self._lock = asyncio.Lock()

    @property
    def subscriptions(self) -> int:
        """Broadcast subscriptions held now (one per subject some open inbox listens on)."""
        return len(self._subs)

    async def join(self, subject: str, inbox: Inbox, handler: RawHandler) -> None:
        """Hand ``inbox`` (through ``handler``, the Bus's wrapper of its queue) the broadcasts on ``subject``."""
        async with self._lock:
            self._listeners.setdefault(subject, {})[inbox] = handler
            if subject in self._subs:
                return
            base = self._bus.consumer_options
            options = ConsumerOptions(start=StartFrom.NEW, max_in_flight=self._max_in_flight,
                                      max_pending=max(base.max_pending, self._max_in_flight),
                                      ack_wait=base.ack_wait)
            try:
                self._subs[subject] = await self._bus.backend.subscribe(
                    subject, self._fan_out(subject), group=self.group, options=options)
            except BaseException:
                self._listeners[subject].pop(inbox, None)
                raise

    async def leave(self, subject: str, inbox: Inbox) -> None:
        """Stop handing ``inbox`` the broadcasts on ``subject``; the last one out closes the subscription."""
        async with self._lock:
            listeners = self._listeners.get(subject, {})
            listeners.pop(inbox, None)
            if listeners:
                return
            self._listeners.pop(subject, None)
            sub = self._subs.pop(subject, None)
        if sub is not None:
            await sub.close()

    async def close(self) -> None:
        """Close every broadcast subscription (after the inboxes closed; idempotent)."""
        async with self._lock:
            subs = list(self._subs.values())
            self._subs.clear()
            self._listeners.clear()
        await asyncio.gather(*(sub.close() for sub in subs))

    def _fan_out(self, subject: str) -> RawHandler:
        async def fan_out(delivery: Delivery) -> None:
            try:
                targets = list(self._listeners.get(subject, {}).items())
                if targets:
                    copies = asyncio.gather(*(self._copy_to(subject, delivery, inbox, handler)
                                              for inbox, handler in targets))
                    await self._hold(delivery, copies)
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

    async def _hold(self, delivery: Delivery, copies: asyncio.Future[list[None]]) -> None:
        """Wait for ``copies``, extending ``delivery``'s lease meanwhile."""
        every = max(0.05, self._bus.consumer_options.ack_wait / 3)
        try:
            while True:
                done, _ = await asyncio.wait({copies}, timeout=every)
                if done:
                    copies.result()
                    return
                await delivery.in_progress()
        except asyncio.CancelledError:
            copies.cancel()
            raise

    async def _copy_to(self, subject: str, delivery: Delivery, inbox: Inbox, handler: RawHandler) -> None:
        """Deliver ``delivery``'s message to ``inbox`` until its copy is acked or dead-lettered (or it closes)."""
        attempt = delivery.attempt
        while True:
            copy = _Copy(delivery.message, attempt=attempt, group=inbox.group)
            await handler(copy)  # returns once the agent settled it (or the inbox gave it back)
            if copy.settled != "nack" or not self._listening(subject, inbox, handler):
                return
            await asyncio.sleep(copy.delay)
            if not self._listening(subject, inbox, handler):
                return
            attempt += 1

    def _listening(self, subject: str, inbox: Inbox, handler: RawHandler) -> bool:
        return inbox.is_open and self._listeners.get(subject, {}).get(inbox) is handler
