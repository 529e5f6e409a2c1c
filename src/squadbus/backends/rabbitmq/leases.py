"""ack_wait bookkeeping of one group member: which deliveries are in their handler and until when.

A delivery's lease starts when it is handed to the handler and lasts ``ack_wait`` seconds;
``Delivery.in_progress`` starts it again. :meth:`HandlerLeases.watch` looks every ``ack_wait / 4``
seconds for unsettled deliveries past their lease and hands them to the subscription, which gives
back everything it holds (``subscriber.py`` says how and why). Cost on the hot path: a dict insert
and pop per delivery (~0.16 µs measured with timeit, against ~440 µs of client CPU per message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("squadbus.backends.rabbitmq")


class Leased(Protocol):
    """What a lease holds: a delivery that can be marked given back."""

    @property
    def settled(self) -> str | None: ...

    def given_back(self) -> None: ...


D = TypeVar("D", bound=Leased)


class HandlerLeases(Generic[D]):
    """The deliveries of one member that are in their handler, their lease ends (monotonic), and
    those given back whose handler has not returned yet."""

    def __init__(self, ack_wait: float) -> None:
        self.ack_wait = ack_wait
        self._ends: dict[D, float] = {}
        self._hung: set[D] = set()
        self._hung_returned = asyncio.Event()
        self._hung_returned.set()

    def start(self, delivery: D) -> None:
        """``delivery`` is handed to the handler."""
        self._ends[delivery] = time.monotonic() + self.ack_wait

    def end(self, delivery: D) -> None:
        """The handler of ``delivery`` returned."""
        self._ends.pop(delivery, None)
        if delivery in self._hung:
            self._hung.discard(delivery)
            if not self._hung:
                self._hung_returned.set()

    def extend(self, delivery: D) -> None:
        """Start the lease of ``delivery`` again (``Delivery.in_progress``)."""
        if delivery in self._ends:
            self._ends[delivery] = time.monotonic() + self.ack_wait

    def late(self) -> list[D]:
        """Unsettled deliveries past their lease."""
        if not self._ends:
            return []
        now = time.monotonic()
        return [d for d, end in self._ends.items() if end <= now and d.settled is None]

    def give_back_all(self) -> None:
        """Mark every unsettled delivery in a handler as given back (its late settle sends nothing);
        :meth:`hung_returned` waits for their handlers."""
        for delivery in list(self._ends):
            if delivery.settled is None:
                delivery.given_back()
                self._hung.add(delivery)
        if self._hung:
            self._hung_returned.clear()

    async def hung_returned(self) -> None:
        """Wait until the handlers of every given-back delivery have returned."""
        await self._hung_returned.wait()

    async def watch(self, give_back: Callable[[list[D]], Awaitable[None]], paused: Callable[[], bool]) -> None:
        """Every ``ack_wait / 4`` seconds (unless ``paused()``), call ``give_back`` with the late
        deliveries, if any. Runs until cancelled."""
        period = self.ack_wait / 4
        while True:
            await asyncio.sleep(period)
            if paused():
                continue
            late = self.late()
            if not late:
                continue
            try:
                await give_back(late)
            except Exception:  # the watch must go on; the broker's consumer_timeout is the backstop
                logger.exception("giving back after ack_wait failed")
