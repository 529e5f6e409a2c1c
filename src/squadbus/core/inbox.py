"""An agent's inbox: its direct messages and the broadcasts it hears, as one async iterator."""

from __future__ import annotations

import asyncio
import dataclasses
from types import TracebackType
from typing import TYPE_CHECKING

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription

if TYPE_CHECKING:
    from squadbus.core.bus import Bus


class Inbox:
    """An agent's inbox: an async iterator of deliveries, one at a time.

    Each delivery must be settled (``ack``/``nack``) before the next arrives;
    asking for the next one acks the previous one if it is still unsettled.
    Direct messages, squad broadcasts and domain broadcasts are three streams
    merged here: order holds within each stream, not across them.
    """

    def __init__(
        self, bus: Bus, agent_id: str, domains: tuple[str, ...], broadcasts: bool, options: ConsumerOptions
    ) -> None:
        subjects.validate_token(agent_id, what="agent_id")
        self.agent_id = agent_id
        self._bus = bus
        self._patterns: list[tuple[str, StartFrom]] = [(subjects.direct(agent_id), StartFrom.EARLIEST)]
        if broadcasts:
            self._patterns.append((subjects.BROADCAST, StartFrom.NEW))
        for name in domains:
            self._patterns.append((subjects.domain(name), StartFrom.NEW))
        self._options = options
        # Unbounded on purpose: each subscription hands over one delivery at a
        # time and waits for it to be settled, so it never holds more than
        # one entry per pattern.
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._subs: list[Subscription] = []
        self._current: Delivery | None = None
        self._closed = False

    @property
    def group(self) -> str:
        """The consumer-group name of this inbox."""
        return f"inbox-{self.agent_id}"

    async def open(self) -> Inbox:
        """Start receiving (idempotent)."""
        if self._subs:
            return self
        self._closed = False
        for pattern, start in self._patterns:
            opts = dataclasses.replace(self._options, start=start)
            self._subs.append(await self._bus.subscribe(pattern, self._enqueue, group=self.group, options=opts))
        return self

    async def _enqueue(self, delivery: Delivery) -> None:
        if self._closed:
            await delivery.nack()
            return
        done = delivery.settled_future()
        self._queue.put_nowait(delivery)
        await done

    async def close(self) -> None:
        """Stop receiving; an unsettled current delivery is nacked for redelivery."""
        self._closed = True
        current, self._current = self._current, None
        if current is not None and current.settled is None:
            await current.nack()
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            await pending.nack()
        subs, self._subs = self._subs, []
        await asyncio.gather(*(self._bus.unsubscribe(sub) for sub in subs))

    async def __aenter__(self) -> Inbox:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Delivery:
        if self._closed or not self._subs:
            raise StopAsyncIteration
        current = self._current
        if current is not None and current.settled is None:
            await current.ack()
        self._current = await self._queue.get()
        return self._current

    async def get(self, timeout: float | None = None) -> Delivery:
        """The next delivery; raises TimeoutError after ``timeout`` seconds."""
        return await asyncio.wait_for(self.__anext__(), timeout)

