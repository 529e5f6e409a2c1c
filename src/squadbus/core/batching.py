"""Batching handlers: collect deliveries into batches for one bulk operation.

Two helpers. :func:`gather_batches` is how :meth:`squadbus.core.bus.Bus.subscribe_batch`
batches on a backend that is not a :class:`~squadbus.core.backend.BatchSubscriber`:
per-delivery calls are collected into batches for a batch handler.

``batched(process, max_batch=500, max_wait=0.05)`` turns
``process(messages) -> None`` into a per-delivery handler. Subscribe it with
``ConsumerOptions(max_in_flight=max_batch)`` so the backend hands over many
deliveries at once; each waits for its batch, and is acked only after
``process`` returned (e.g. after COMMIT), or nacked if it raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from squadbus.core.backend import BatchRawHandler, ConsumerOptions, Delivery, RawHandler, invoke_batch
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


class _Gatherer:
    """Collects per-delivery calls into batches for a batch handler (see :func:`gather_batches`)."""

    def __init__(self, process: BatchRawHandler, options: ConsumerOptions, max_wait: float) -> None:
        self.process = process
        self.options = options
        self.max_batch = options.batch_size
        self.max_wait = max_wait
        self.current: list[Delivery] = []
        self.timer: asyncio.TimerHandle | None = None
        self.flushing = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    async def _run(self, batch: list[Delivery]) -> None:
        async with self.flushing:
            await invoke_batch(self.process, batch, self.options)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.current = self.current, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def __call__(self, delivery: Delivery) -> None:
        if not self.current:
            self.timer = asyncio.get_running_loop().call_later(self.max_wait, self.flush)
        self.current.append(delivery)
        if len(self.current) >= self.max_batch:
            self.flush()
        # Shielded: a cancelled caller must not cancel the outcome other code waits for.
        await asyncio.shield(delivery.settled_future())


def gather_batches(process: BatchRawHandler, *, options: ConsumerOptions, max_wait: float) -> RawHandler:
    """A RawHandler collecting deliveries into batches of up to ``options.batch_size`` for ``process``.

    Subscribe it with ``max_in_flight >= options.batch_size``. A batch goes to
    ``process`` when full or ``max_wait`` seconds after its first delivery;
    batches run one at a time, in order (:func:`invoke_batch`: what
    ``process`` leaves unsettled is nacked). Each per-delivery call returns
    once its delivery is settled.
    """
    if max_wait < 0:
        raise ValueError("max_wait must be >= 0")
    return _Gatherer(process, options, max_wait)
