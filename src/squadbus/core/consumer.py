"""The consumer runtime: runs a subscription's handler over a :class:`~squadbus.core.source.DeliverySource`.

One :class:`Consumer` per subscription, one task while it runs. It owns what
every backend's subscription does alike (docs/design/inboxes.md, "One
consumer runtime in core"):

* one delivery at a time (``max_in_flight=1``), started in the source's
  order, each handler call awaited before the next delivery is pulled;
* up to ``max_in_flight`` handler calls at once: worker tasks started as
  needed (one while idle), each taking the next delivery and running its
  handler (one of them waits on the source when none is ready), so
  deliveries start in the source's order;
* batches (:meth:`Consumer.batches`): what the source has ready, up to
  ``batch_size``, waiting at most ``max_wait`` after the first delivery for
  more; one batch at a time, in order; a source with ``gathers_ahead = True``
  (NATS) has the next batch gathered (in slices of :data:`AHEAD_SLICE`, the
  loop yielding between them) while the handler runs the current one;
* fairness: after :data:`FAIRNESS_STREAK` deliveries in a row without waiting
  for the source (handed over one at a time or in batches), it yields to the
  event loop once (handlers that never suspend would otherwise starve it); a
  source may say how many with a
  ``fairness_streak`` attribute (Redis: its buffer's size, since it makes
  the consumer wait once that is handed out);
* :meth:`Consumer.close`: stop pulling, let the handlers in progress finish
  and settle, give back a batch being gathered, then close the source; a
  cancelled close cancels the handlers, still closes the source and raises
  CancelledError.

Every handler runs through :func:`invoke` / :func:`invoke_batch`, which nack
what a bare handler left unsettled (the inbox hubs call :func:`invoke` too).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from squadbus.core.errors import Closed

if TYPE_CHECKING:
    from squadbus.core.backend import BatchRawHandler, ConsumerOptions, Delivery, RawHandler
    from squadbus.core.source import DeliverySource

logger = logging.getLogger("squadbus.consumer")

FAIRNESS_STREAK = 64
"""Deliveries a consumer hands over in a row, without the source making it wait, before it yields to the loop."""

AHEAD_SLICE = 16
"""Deliveries pulled (and decoded by the source) between two yields while gathering a batch ahead of the
running handler: its round trips go on meanwhile (NATS before the runtime: 64 held each of the db-writer's
database round trips up to ~1 ms, 16 ~0.2 ms)."""

_RETRY_SOURCE = 1.0  # seconds before pulling again after the source failed unexpectedly

_SETTLES = "_squadbus_settles_every_delivery"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Awaitable[None]])
S = TypeVar("S", bound="DeliverySource")


@runtime_checkable
class RuntimeHolder(Protocol):
    """Optional for a :class:`~squadbus.core.source.DeliverySource`: a ``runtime`` attribute, which the
    :class:`Consumer` over it sets to itself (a backend closes a subscription through its source's runtime)."""

    runtime: Consumer[Any] | None


def settles_itself(handler: HandlerT) -> HandlerT:
    """Mark ``handler`` (a RawHandler or BatchRawHandler) as keeping :func:`invoke`'s promises itself:
    it settles every delivery, nacks the unsettled ones when cancelled, and raises nothing else.
    :func:`invoke` then calls it directly (one coroutine less per message). The Bus's wrappers are."""
    setattr(handler, _SETTLES, True)
    return handler


def invoke(handler: RawHandler, delivery: Delivery, options: ConsumerOptions) -> Awaitable[None]:
    """Run ``handler`` on ``delivery`` the way every consumer must (await the result).

    The Bus's wrapper always settles; a bare RawHandler might not, so an
    unsettled delivery is nacked with ``options.backoff(delivery.attempt)``
    (logged when the handler raised). Cancelled while unsettled: nacked at
    once, then the cancellation goes on, so closing a consumer loses nothing.
    """
    if getattr(handler, _SETTLES, False):
        return handler(delivery)
    return _invoke(handler, delivery, options)


async def _invoke(handler: RawHandler, delivery: Delivery, options: ConsumerOptions) -> None:
    try:
        await handler(delivery)
    except asyncio.CancelledError:
        if delivery.settled is None:
            await delivery.nack()
        raise
    except Exception:
        logger.exception("handler wrapper raised for message %s", delivery.message.id)
    if delivery.settled is None:
        await delivery.nack(options.backoff(delivery.attempt))


def invoke_batch(handler: BatchRawHandler, deliveries: Sequence[Delivery], options: ConsumerOptions) -> Awaitable[None]:
    """:func:`invoke` for a batch: run ``handler``, then nack whatever it left unsettled."""
    if getattr(handler, _SETTLES, False):
        return handler(deliveries)
    return _invoke_batch(handler, deliveries, options)


async def _invoke_batch(handler: BatchRawHandler, deliveries: Sequence[Delivery], options: ConsumerOptions) -> None:
    try:
        await handler(deliveries)
    except asyncio.CancelledError:
        for delivery in deliveries:
            if delivery.settled is None:
                await delivery.nack()
        raise
    except Exception:
        logger.exception("batch handler wrapper raised for %d messages", len(deliveries))
    for delivery in deliveries:
        if delivery.settled is None:
            await delivery.nack(options.backoff(delivery.attempt))


async def _run_batch(handler: BatchRawHandler, deliveries: Sequence[Delivery], options: ConsumerOptions) -> None:
    await invoke_batch(handler, deliveries, options)


async def batch_only(delivery: Delivery) -> None:
    """The per-delivery handler of a batch subscription, which a backend never calls."""
    raise AssertionError("a batch subscription has no per-delivery handler")


class Consumer(Generic[S]):
    """One subscription's handler run over its source: the :class:`~squadbus.core.backend.Subscription` a
    backend returns. Give it ``handler`` (one delivery per call, ``options.max_in_flight`` calls at a
    time) or ``batches`` (1 to ``options.batch_size`` deliveries per call, one call at a time, waiting at
    most ``max_wait`` after the first delivery for more: a BatchSubscriber's), then :meth:`start` it.
    Generic in the source's type (:attr:`source`, for a backend's subclass); a source with a ``runtime``
    attribute (:class:`RuntimeHolder`) gets it set to the consumer."""

    def __init__(
        self, source: S, options: ConsumerOptions, *, handler: RawHandler | None = None,
        batches: BatchRawHandler | None = None, max_wait: float = 0.0,
    ) -> None:
        if (handler is None) == (batches is None):
            raise ValueError("a consumer needs one of handler and batches, not both")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.source: S = source
        """The source of deliveries this consumer runs its handler over."""
        if isinstance(source, RuntimeHolder):
            source.runtime = self
        self._handler = handler or batch_only
        self._batch_handler = batches
        self._max_wait = max_wait
        self._options = options
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # True while the task waits for the source (receive): the only place close() cancels it.
        self._waiting = False
        # max_in_flight > 1 (_run_concurrently): the workers, those waiting on the source (which close()
        # cancels), how many do (at most one), and whether a check for a missing one is scheduled.
        self._workers: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[None]] = set()
        self._receivers = 0
        self._worker_check = False
        # _run_batches_ahead: the batch handler's task (the last one started).
        self._batch_task: asyncio.Task[None] | None = None
        self._limit = 1
        self._name = ""
        self._fairness_streak: int = getattr(source, "fairness_streak", FAIRNESS_STREAK)
        self._gathers_ahead: bool = getattr(source, "gathers_ahead", False)

    @property
    def pattern(self) -> str:
        return self.source.pattern

    @property
    def group(self) -> str | None:
        return self.source.group

    def start(self, name: str) -> None:
        """Start pulling from the source in a task named ``name``."""
        if self._batch_handler is not None and self._gathers_ahead:
            run = self._run_batches_ahead(self._batch_handler, name)
        elif self._batch_handler is not None:
            run = self._run_batches(self._batch_handler)
        elif self._options.max_in_flight > 1:
            run = self._run_concurrently(self._options.max_in_flight, name)
        else:
            run = self._run()
        self._task = asyncio.get_running_loop().create_task(run, name=name)

    async def _receive(self, max_count: int, wait: float) -> Sequence[Delivery] | None:
        """What the source hands out within ``wait`` (may be empty); None when the source is closed. An
        unexpected failure of the source is logged, then it is asked again after a pause."""
        self._waiting = True
        try:
            return await self.source.receive(max_count, wait)
        except Closed:
            return None
        except Exception:
            await self._source_failed()
            return ()
        finally:
            self._waiting = False

    async def _run(self) -> None:
        # The hot path: no coroutine of its own per delivery while the source has some ready (poll), and
        # one (receive) per wait.
        source, handler, options = self.source, self._handler, self._options
        poll, receive = source.poll, source.receive
        fairness_streak = self._fairness_streak
        direct = getattr(handler, _SETTLES, False)  # invoke()'s test, once
        streak = 0
        while not self._closing:
            got = poll(1)
            if got:
                streak += 1
                if streak >= fairness_streak:
                    streak = 0
                    await self._yield(got)
            else:
                streak = 0
                self._waiting = True
                try:
                    got = await receive(1, math.inf)
                except Closed:
                    return
                except Exception:
                    await self._source_failed()
                    continue
                finally:
                    self._waiting = False
                if not got:
                    continue
            await (handler(got[0]) if direct else _invoke(handler, got[0], options))

    async def _yield(self, taken: Sequence[Delivery]) -> None:
        """Let the other tasks run (fairness), holding ``taken`` for the next handler call: given back to the
        source if cancelled meanwhile (a cancelled close, the loop shutting down)."""
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.source.give_back(taken)
            raise

    async def _source_failed(self) -> None:
        """Log the source's failure being handled and pause (close() may cancel the pause)."""
        logger.exception("the source of %s (%s) failed; pulling again in %ss",
                         self.group or "<ephemeral>", self.pattern, _RETRY_SOURCE)
        self._waiting = True
        try:
            await asyncio.sleep(_RETRY_SOURCE)
        finally:
            self._waiting = False

    async def _run_concurrently(self, limit: int, name: str) -> None:
        # Workers started as needed, up to ``limit``: each takes the next delivery and runs its handler; one
        # waits on the source when none is ready, and one with nothing to do while another waits ends. Not
        # a task per delivery: 20,000 stored messages into a Redis group with max_in_flight=8,
        # consumer CPU per message (min of 3, load ~2): 15.1 us with a task per delivery, 5.5-5.9 with
        # workers. Idle, a consumer holds one worker, whatever its max_in_flight.
        self._limit, self._name = limit, name
        self._start_worker()
        while self._workers:
            await asyncio.wait(list(self._workers))

    def _start_worker(self) -> None:
        task = asyncio.get_running_loop().create_task(self._work(), name=f"{self._name}-worker")
        self._workers.add(task)
        task.add_done_callback(self._worker_ended)

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("a worker of %s (%s) failed", self.group or "<ephemeral>", self.pattern, exc_info=error)

    def _need_worker(self) -> None:
        """Called soon after a worker took a delivery while no other waited on the source: if still none
        does (the handler suspended), start one that will, so up to ``limit`` handlers run at once."""
        self._worker_check = False
        if not self._closing and not self._receivers and len(self._workers) < self._limit:
            self._start_worker()

    async def _work(self) -> None:
        """A worker: the next delivery, then its handler, until closing (or not needed)."""
        me = asyncio.current_task()
        assert me is not None
        source, handler, options, idle = self.source, self._handler, self._options, self._idle
        poll, call_soon = source.poll, asyncio.get_running_loop().call_soon
        fairness_streak = self._fairness_streak
        direct = getattr(handler, _SETTLES, False)
        streak = 0
        while not self._closing:
            got = poll(1)
            if got:
                streak += 1
                if streak >= fairness_streak:
                    streak = 0
                    await self._yield(got)
            else:
                streak = 0
                if self._receivers:
                    return  # another worker waits on the source (never two receives at once)
                self._receivers += 1
                idle.add(me)
                try:
                    got = await source.receive(1, math.inf)
                except Closed:
                    return
                except Exception:
                    logger.exception("the source of %s (%s) failed; pulling again in %ss",
                                     self.group or "<ephemeral>", self.pattern, _RETRY_SOURCE)
                    await asyncio.sleep(_RETRY_SOURCE)
                    continue
                finally:
                    self._receivers -= 1
                    idle.discard(me)
                if not got:
                    continue
            if not self._receivers and not self._worker_check and len(self._workers) < self._limit:
                self._worker_check = True
                call_soon(self._need_worker)
            await (handler(got[0]) if direct else _invoke(handler, got[0], options))

    async def _run_batches(self, handler: BatchRawHandler) -> None:
        # Fairness as one at a time: once batches brought the fairness streak of deliveries in a row without
        # waiting for the source, a yield before the next handler call (a batch handler that never suspends,
        # on a source that always has some, would otherwise starve the loop).
        source, options = self.source, self._options
        limit = options.batch_size
        fairness_streak = self._fairness_streak
        streak = 0
        while not self._closing:
            batch = list(source.poll(limit))
            if not batch:
                streak = 0
                waited = await self._receive(limit, math.inf)
                if waited is None:
                    return
                batch.extend(waited)
                if not batch:
                    continue
            try:
                await self._fill(batch, limit)
            except asyncio.CancelledError:
                source.give_back(batch)  # closed while waiting for more
                raise
            streak += len(batch)
            if streak >= fairness_streak:
                streak = 0
                await self._yield(batch)
            await invoke_batch(handler, batch, options)

    async def _run_batches_ahead(self, handler: BatchRawHandler, name: str) -> None:
        # Batches one at a time, in order, but the next is gathered while the handler runs the current one
        # (a task): the db-writer's handler mostly waits on its database, and gathering after it returned
        # put the source's decoding (~5 ms of CPU per 500 NATS messages) between two writes.
        source, options = self.source, self._options
        limit = options.batch_size
        loop = asyncio.get_running_loop()
        running: asyncio.Task[None] | None = None
        batch: list[Delivery] = []
        try:
            while not self._closing:
                batch = []
                await self._take(batch, limit, running)
                if not batch:
                    waited = await self._receive(self._slice(limit, running), math.inf)
                    if waited is None:
                        return
                    batch.extend(waited)
                    if not batch:
                        continue
                await self._fill(batch, limit, running)
                if running is not None:
                    await running
                    running = None
                if self._closing:
                    break
                running = self._batch_task = loop.create_task(
                    _run_batch(handler, batch, options), name=f"{name}-batch")
                batch = []
                await asyncio.sleep(0)  # the handler starts (its first write) before the next batch is gathered
        finally:
            if batch:
                source.give_back(batch)  # gathered, never handed to the handler
            if running is not None:
                await running

    @staticmethod
    def _slice(count: int, running: asyncio.Task[None] | None) -> int:
        """How many to ask the source for at once: ``count``, at most :data:`AHEAD_SLICE` while ``running``."""
        return count if running is None or running.done() else min(count, AHEAD_SLICE)

    async def _take(self, batch: list[Delivery], limit: int, running: asyncio.Task[None] | None) -> None:
        """Add to ``batch`` what the source has ready, up to ``limit``: at once, or in slices of
        :data:`AHEAD_SLICE` with a yield after each while ``running`` (the handler) has not finished."""
        poll = self.source.poll
        if running is None or running.done():
            batch.extend(poll(limit - len(batch)))
            return
        while len(batch) < limit and not self._closing:
            more = poll(min(AHEAD_SLICE, limit - len(batch)))
            if not more:
                return
            batch.extend(more)
            await asyncio.sleep(0)

    async def _fill(self, batch: list[Delivery], limit: int, running: asyncio.Task[None] | None = None) -> None:
        """Add to ``batch`` what the source hands out, up to ``limit``, for at most ``max_wait`` from now
        (while ``running``, pulled in slices: :meth:`_take`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while len(batch) < limit and not self._closing:
            before = len(batch)
            await self._take(batch, limit, running)
            if len(batch) > before:
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            waited = await self._receive(self._slice(limit - len(batch), running), remaining)
            if waited is None:
                return
            batch.extend(waited)

    async def close(self) -> None:
        """Stop pulling: the handler calls in progress finish and settle, a batch still being gathered goes
        back to the source (:meth:`DeliverySource.give_back`), then the source closes. Idempotent. Cancelled
        while it waits for the handlers, it cancels them, still closes the source, and raises CancelledError."""
        if self._closing:
            return
        self._closing = True
        task = self._task
        error: BaseException | None = None
        if task is not None:
            if self._waiting:
                task.cancel()
            for worker in list(self._idle):
                worker.cancel()
            try:
                await asyncio.wait((task,))  # not `await task`: its cancellation is not the caller's
            except asyncio.CancelledError:
                # The caller is cancelled (a timeout around Bus.close, a shutdown): the handlers in progress
                # are cancelled too (what they leave unsettled is nacked), the source still closes, and the
                # cancellation goes on.
                await self._abort(task)
                await self.source.close()
                raise
            error = None if task.cancelled() else task.exception()
        await self.source.close()
        if error is not None:
            raise error

    async def _abort(self, task: asyncio.Task[None]) -> None:
        """Cancel the consumer's task, its workers and a batch handler running as a task; wait for them."""
        running = [task, *self._workers]
        if self._batch_task is not None:
            running.append(self._batch_task)
        for each in running:
            each.cancel()
        await asyncio.wait(running)
