"""What a backend opens for one subscription: a source of deliveries, pulled by the consumer runtime.

A backend that implements :class:`DeliverySource` only reads, decodes and
settles (each :class:`~squadbus.core.backend.Delivery` it hands out knows how
to ack, nack and term itself); :mod:`squadbus.core.consumer` runs the
handlers over it: one delivery or one batch at a time, ``max_in_flight``,
fairness to the event loop, and close (docs/design/inboxes.md, "One consumer
runtime in core"). Every backend's subscriptions are one.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from squadbus.core.backend import Delivery


class DeliverySource(Protocol):
    """The deliveries of one member of a consumer group ``(group, pattern)``, pulled by one consumer.

    Contracts:

    * Deliveries come out of :meth:`poll` and :meth:`receive` in the order the
      backend holds the messages of one ``task_execution_id`` (a redelivery
      first, being the oldest), each counted by the backend as handed out
      (unsettled) until its delivery is settled.
    * Only one consumer pulls from a source, and never two calls at once.
    * :meth:`receive` is safe to cancel: cancelled while it waits, it takes
      nothing, and a wake-up it was given goes to another member.
    * After :meth:`close` nothing more is handed out; deliveries handed out
      before may still be settled.

    Optional: a ``fairness_streak`` attribute (int), how many deliveries the
    consumer hands over in a row before it yields to the event loop
    (default :data:`~squadbus.core.consumer.FAIRNESS_STREAK`). A source that
    makes the consumer wait whenever its bounded buffer runs dry can name the
    buffer's size.
    """

    @property
    def pattern(self) -> str:
        """The subject pattern the group reads."""
        ...

    @property
    def group(self) -> str | None:
        """The group's name; None for a fan-out subscription."""
        ...

    def poll(self, max_count: int) -> Sequence[Delivery]:
        """Up to ``max_count`` deliveries ready now, without waiting (empty when none). The consumer's hot
        path: no coroutine when the source has deliveries buffered."""
        ...

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        """Up to ``max_count`` deliveries, waiting up to ``wait`` seconds (``math.inf``: no limit) for the
        first. Empty when ``wait`` passed with nothing, or when woken with nothing for this member (the
        consumer asks again). Raises :class:`~squadbus.core.errors.Closed` once the source is closed."""
        ...

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        """Take back ``deliveries`` the consumer received but never handed to a handler (it closed while it
        gathered a batch), in their order, at once: as if never delivered where the backend can tell
        (the attempt count stays), else as a nack with no delay."""
        ...

    async def close(self) -> None:
        """Stop handing out deliveries and free what the source holds; called once the consumer's handlers
        have finished. Idempotent."""
        ...


async def within(ready: Awaitable[object], wait: float) -> bool:
    """Await ``ready`` for at most ``wait`` seconds (``math.inf``: no limit): True once it completed, False
    when the time ran out. A source's :meth:`DeliverySource.receive` between an empty poll and the next."""
    if wait == math.inf:
        await ready
        return True
    try:
        async with asyncio.timeout(wait):
            await ready
    except TimeoutError:
        return False
    return True


async def poll_or_wait(
    poll: Callable[[int], Sequence[Delivery]], ready: Callable[[], Awaitable[object]], max_count: int, wait: float
) -> Sequence[Delivery]:
    """A source's :meth:`DeliverySource.receive` after its closed check: what ``poll`` has now; else, once
    ``ready()`` completed within ``wait`` seconds, what it has then (empty when the time ran out)."""
    got = poll(max_count)
    if got or wait <= 0:
        return got
    if not await within(ready(), wait):
        return ()
    return poll(max_count)
