"""Batching handlers: collect deliveries into batches for one bulk operation.

``batched(process, max_batch=500, max_wait=0.05)`` turns
``process(messages) -> None`` into a per-delivery handler. Subscribe it with
``ConsumerOptions(max_in_flight=max_batch)`` so the backend hands over many
deliveries at once; each waits for its batch, and is acked only after
``process`` returned (e.g. after COMMIT), or nacked if it raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from squadbus.core.backend import Delivery
from squadbus.core.dispatch import Handler
from squadbus.core.envelope import Message

BatchProcessor = Callable[[Sequence[Message]], Awaitable[None]]


class _Batch:
    __slots__ = ("done", "messages", "started", "timer")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.started = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None


def batched(process: BatchProcessor, *, max_batch: int = 500, max_wait: float = 0.05) -> Handler:
    """A handler that runs ``process`` once per batch of up to ``max_batch`` messages.

    A batch is flushed when full or ``max_wait`` seconds after its first
    message. Batches are processed one at a time, in order.
    """
    if max_batch < 1 or max_wait < 0:
        raise ValueError("max_batch must be >= 1 and max_wait >= 0")
    current: _Batch | None = None
    flushing = asyncio.Lock()
    tasks: set[asyncio.Task[None]] = set()

    async def flush(batch: _Batch) -> None:
        async with flushing:
            try:
                await process(batch.messages)
            except BaseException as exc:
                batch.done.set_exception(exc)
                batch.done.exception()  # mark retrieved: every waiter re-raises it
                if not isinstance(exc, Exception):
                    raise
            else:
                batch.done.set_result(None)

    def schedule(batch: _Batch) -> None:
        nonlocal current
        if batch.started:
            return
        batch.started = True
        if current is batch:
            current = None
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(flush(batch))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def handler(delivery: Delivery) -> None:
        nonlocal current
        batch = current
        if batch is None:
            batch = current = _Batch()
            batch.timer = asyncio.get_running_loop().call_later(max_wait, schedule, batch)
        batch.messages.append(delivery.message)
        if len(batch.messages) >= max_batch:
            schedule(batch)
        await asyncio.shield(batch.done)

    return handler
