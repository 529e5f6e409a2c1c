"""An agent's inbox: its direct messages and the broadcasts it hears, as one async iterator."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom, Subscription
from squadbus.core.dispatch import Handler, failure_policy, wrap
from squadbus.core.errors import Closed, ConfigError, Nack, ReceiveTimeout
from squadbus.core.inbox_source import MultiplexesInboxes
from squadbus.core.tasks import cancel_and_wait, wait_ended

if TYPE_CHECKING:
    from squadbus.core.bus import Bus

logger = logging.getLogger("squadbus.inbox")

InboxHandler = Callable[[Delivery], object]
"""What ``bus.inbox(agent, handler=...)`` takes: a plain function of a delivery, called inline as each delivery
arrives, or an ``async def`` run by the inbox's own task (see :class:`Inbox`)."""


def is_async_handler(handler: object) -> bool:
    """True for an ``async def`` (or an object whose ``__call__`` is one, or a partial of either)."""
    call = type(handler).__call__ if callable(handler) else None
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class _Mailbox:
    """An inbox's unbounded FIFO of deliveries (None: closed), waited on through a bare future.

    Not an ``asyncio.Queue``: its ``get()`` is a coroutine kept alive for as long as an agent waits,
    and a host waits in 10,000 inboxes at once, every object of that wait scanned by each full
    collection (issue 15: scenario 5's tracked objects and GC pauses)."""

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: deque[Delivery | None] = deque()
        self._getters: deque[asyncio.Future[None] | _NextDelivery] = deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Delivery | None, wakeups: Wakeups | None = None) -> None:
        """Queue ``item`` and wake a waiting loop: at once, or with ``wakeups`` (a fan-out's batch) when
        the loop waits through its inbox's own awaitable."""
        self._items.append(item)
        getters = self._getters
        if getters:
            getter = getters[0]
            if (wakeups is not None and type(getter) is _NextDelivery and getter._state == _WAITING
                    and getter._callback is not None):
                # A fan-out's copy to an agent waiting in `async for`: woken, its task's wake-up left to the
                # batch (set_result without the call_soon), inline: once per inbox per broadcast.
                getters.popleft()
                getter._state = _WOKEN
                wakeups._waiters.append(getter)
                return
            self._wake()

    def get_nowait(self) -> Delivery | None:
        return self._items.popleft()

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved when something is put (check again: another loop may take it first)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._getters.append(fut)
        return fut

    def gave_up(self, fut: asyncio.Future[None] | _NextDelivery) -> None:
        """A loop stopped waiting on ``fut`` (cancelled): pass a wake-up it got on, or forget it."""
        if fut.done() and not fut.cancelled():
            if self._items:
                self._wake()
        elif fut in self._getters:
            self._getters.remove(fut)

    def _wake(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return


class Wakeups:
    """The wake-ups of the tasks one fan-out gives a delivery to, run by one loop callback.

    A broadcast copied to 10,000 inboxes wakes 10,000 agent tasks. Each woken waiter would schedule its
    task's wake-up with ``loop.call_soon`` (a ``Handle`` and the loop's bookkeeping each: about a fifth
    of a copy's CPU, ``bench/bench_fanout.py``); collected here they are scheduled as one callback that
    runs them in the order the copies were queued, each in its task's context as ``Handle`` would,
    in the same turn of the loop the separate callbacks would have run in. An error in one (a task's
    wake-up raises none in practice) goes to the loop's exception handler, as a ``Handle``'s would.
    """

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Woken waiters that keep their task's wake-up callback until the batch runs it.
        self._waiters: list[_NextDelivery] = []

    def add(self, waiter: _NextDelivery) -> None:
        """Run the wake-up ``waiter`` holds (its task's, from ``add_done_callback``) when the batch runs."""
        self._waiters.append(waiter)

    def flush(self) -> None:
        """Schedule what was collected as one callback (nothing if nothing was)."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            self._loop.call_soon(self._run, waiters)

    def _run(self, waiters: list[_NextDelivery]) -> None:
        for waiter in waiters:
            callback, context = waiter._callback, waiter._context
            if callback is None:  # removed meanwhile (remove_done_callback, or the waiting coroutine closed)
                continue
            waiter._callback = waiter._context = None
            try:
                (context if context is not None else contextvars.copy_context()).run(callback, waiter)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # what asyncio.Handle._run does with a callback's error
                self._loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc, "handle": None})


_IDLE, _WAITING, _WOKEN, _CANCELLED = range(4)


class _NextDelivery:
    """What ``async for`` awaits on an open inbox with no unsettled delivery: the next delivery.

    An awaitable that is its own iterator (as ``asyncio.Future`` is) and the future its task waits on:
    each step either yields itself to the task, queued in the mailbox as a waiter, or ends with the
    delivery (``StopIteration(delivery)``), or with ``StopAsyncIteration`` once the inbox is closed.
    It keeps the task's wake-up callback until the mailbox wakes it (``set_result``) or the task is
    cancelled (``cancel``), then schedules that callback as a future would. One per inbox, allocated at
    open and reused while no other loop is using it: a waiting agent costs the collector only the
    callback its task makes for each wait, not a coroutine, a future iterator and a future more
    (issue 15: 10,000 waiting agents, every object of their waits scanned by each full collection).

    ``_asyncio_future_blocking`` is None except while the task waits on it, so ``asyncio.ensure_future``
    (``wait_for(anext(inbox), t)``, ``ensure_future(anext(inbox))``) wraps it as an awaitable, not a future."""

    __slots__ = ("_asyncio_future_blocking", "_callback", "_context", "_inbox", "_loop", "_state", "busy")

    def __init__(self, inbox: Inbox) -> None:
        self._inbox = inbox
        self._state = _IDLE
        self._callback: Callable[[_NextDelivery], object] | None = None
        self._context: contextvars.Context | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asyncio_future_blocking: bool | None = None
        self.busy = False

    def __await__(self) -> _NextDelivery:
        return self

    def __next__(self) -> _NextDelivery:
        self._state = _IDLE  # woken (or the first step): look again, another loop may have taken it
        self._asyncio_future_blocking = None
        inbox = self._inbox
        queue = inbox._queue
        items = queue._items  # the mailbox's deque, read here without a call: once per delivery
        if not items:
            self._state = _WAITING
            self._loop = asyncio.get_running_loop()
            self._asyncio_future_blocking = True  # what Future.__await__ sets: the task waits on it
            queue._getters.append(self)
            return self
        self.busy = False
        delivery = items.popleft()
        if delivery is None:
            queue.put_nowait(None)  # for the next waiting loop
            raise StopAsyncIteration
        inbox._current = delivery
        raise StopIteration(delivery)

    def send(self, value: None) -> _NextDelivery:
        """The step a coroutine takes when a tracer is set (otherwise it calls ``__next__``)."""
        return self.__next__()

    def throw(self, typ: BaseException | type[BaseException], val: BaseException | None = None,
              tb: object = None) -> _NextDelivery:
        """Cancelled (or another exception) while waiting: a wake-up this loop got goes to another; re-raise."""
        self._give_up()
        if isinstance(typ, BaseException):
            raise typ
        raise val if val is not None else typ()

    def close(self) -> None:
        """The awaiting coroutine is closed while waiting."""
        self._give_up()

    def _give_up(self) -> None:
        self.busy = False
        if self._state != _IDLE:
            self._inbox._queue.gave_up(self)
        self._state = _IDLE
        self._asyncio_future_blocking = None
        self._callback = self._context = None

    # ---- the future the task waits on (what asyncio.Task calls) -----------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop of the task waiting."""
        assert self._loop is not None
        return self._loop

    def add_done_callback(self, fn: Callable[[_NextDelivery], object], *,
                          context: contextvars.Context | None = None) -> None:
        """The waiting task's wake-up (one task waits on this at a time)."""
        self._callback, self._context = fn, context
        if self._state != _WAITING:
            self._schedule()

    def remove_done_callback(self, fn: Callable[[_NextDelivery], object]) -> int:
        """Forget ``fn``; 1 if it was the callback, else 0."""
        if self._callback is not fn:
            return 0
        self._callback = self._context = None
        return 1

    def done(self) -> bool:
        """False while a task waits on this and nothing woke or cancelled it."""
        return self._state != _WAITING

    def cancelled(self) -> bool:
        """True once the waiting task was cancelled."""
        return self._state == _CANCELLED

    def set_result(self, result: None) -> None:
        """The mailbox's wake-up: something was put (the task looks again)."""
        if self._state == _WAITING:
            self._state = _WOKEN
            self._schedule()

    def cancel(self, msg: object = None) -> bool:
        """The waiting task is cancelled: wake it, to have CancelledError thrown in."""
        if self._state != _WAITING:
            return False
        self._state = _CANCELLED
        self._schedule()
        return True

    def result(self) -> None:
        """None once woken; raises CancelledError once cancelled."""
        if self._state == _CANCELLED:
            raise asyncio.CancelledError

    def exception(self) -> BaseException | None:
        """None (a wake-up carries no error)."""
        return None

    def _schedule(self) -> None:
        callback, context = self._callback, self._context
        self._callback = self._context = None
        if callback is not None and self._loop is not None:
            self._loop.call_soon(callback, self, context=context)


class Inbox:
    """An agent's inbox: an async iterator of deliveries, one at a time.

    The loop it is made for settles each delivery with ``async with``::

        async with bus.inbox("dev-1") as inbox:
            async for delivery in inbox:
                async with delivery:      # returns: ack; raises: retried later, attempt + 1
                    ...

    A failure is settled as a subscription handler's would be (see
    :meth:`Delivery.fail <squadbus.core.backend.Delivery.fail>`): retried with
    backoff, dead-lettered on ``agent.dlq.inbox-<agent>`` after ``max_deliver``.
    A delivery still unsettled when the agent asks for the next one (say the
    loop body raised and the agent iterates again) is never acked: it is
    failed the same way, with a warning, so it comes back. Only the agent acks.

    Direct messages sent before the inbox was first opened wait for it
    (within what the backend retains; on a durable backend that includes
    what earlier runs left unacked); squad and domain broadcasts are received
    while the inbox is open: the Bus reads each broadcast subject once and
    copies it to its open inboxes (:mod:`squadbus.core.broadcasts`; with
    ``Bus(host_id=...)`` a restarted host also gets what it had not finished).
    These are separate streams merged here: order holds within each, not
    across them.

    Iterating or calling :meth:`get` on an inbox that is not open raises
    :class:`~squadbus.core.errors.Closed`; closing it ends the loops waiting on it.

    **With a handler** (``bus.inbox(agent, handler=on_message)``) the inbox is not iterated; the
    handler gets each delivery, in order, and settles it as a subscription's handler would: it returns
    → ack (unless it settled the delivery itself); it raises → failed as above. What runs it:

    * a plain function is called inline, by whatever hands the delivery over (the Bus's broadcast
      fan-out, the direct messages' reader), with no task per agent. A squad broadcast to 10,000 such
      inboxes is 10,000 function calls, not 10,000 task wake-ups (issue 15, scenario 5). It must not
      block: for slow work it starts a task of its own (and settles the delivery when that ends, or
      acks now and accepts that a crash loses the work);
    * an ``async def`` is run by one task of the inbox, one delivery at a time (``async for`` with
      ``async with delivery`` inside). Closing lets the delivery in hand finish within the Bus's
      ``close_timeout``, then cancels it (the delivery is nacked).
    """

    # Slots: a squad broadcast reads two fields of each of 10,000 inboxes; a slot is one load, a __dict__ a
    # lookup in one more object per inbox (memory touched per copy, bench/bench_fanout.py).
    __slots__ = ("__weakref__", "_broadcasts", "_bus", "_current", "_direct", "_group", "_handler", "_inline",
                 "_next_delivery", "_open", "_options", "_queue", "_runner", "_settling", "_shared", "_subs",
                 "agent_id")

    def __init__(
        self, bus: Bus, agent_id: str, domains: tuple[str, ...], broadcasts: bool, options: ConsumerOptions,
        handler: InboxHandler | None = None,
    ) -> None:
        subjects.validate_token(agent_id, what="agent_id")
        if handler is not None and not callable(handler):
            raise ConfigError(f"the handler of the inbox of {agent_id} is not callable: {handler!r}")
        self._handler = handler
        # The plain-function handler called inline by offer() (None: queued for a loop or the inbox's task).
        self._inline: InboxHandler | None = None if handler is None or is_async_handler(handler) else handler
        self._runner: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[object]] = set()
        self.agent_id = agent_id
        self._group = f"inbox-{agent_id}"
        self._bus = bus
        self._direct = subjects.direct(agent_id)
        # Broadcast subjects are read once per Bus and copied here (squadbus.core.broadcasts).
        self._broadcasts = ([subjects.BROADCAST] if broadcasts else []) + [subjects.domain(d) for d in domains]
        self._options = options
        # Unbounded on purpose, bounded in fact: the direct subscription hands over one
        # delivery at a time and waits for it to be settled, and the Bus's broadcast hub
        # holds at most max_in_flight broadcasts per subject. None is the "closed"
        # wake-up for waiting loops.
        self._queue = _Mailbox()
        self._subs: list[Subscription] = []
        # The direct subscription when the backend multiplexes inboxes (not one of the Bus's own).
        self._shared: Subscription | None = None
        self._current: Delivery | None = None
        self._next_delivery = _NextDelivery(self)
        self._open = False

    @property
    def group(self) -> str:
        """The consumer-group name of this inbox."""
        return self._group

    @property
    def is_open(self) -> bool:
        """True between :meth:`open` and :meth:`close`."""
        return self._open

    async def open(self) -> Inbox:
        """Start receiving (idempotent)."""
        if self._open:
            return self
        self._open = True
        self._queue = _Mailbox()
        bus = self._bus
        try:
            opts = dataclasses.replace(self._options, start=StartFrom.EARLIEST)
            backend = bus.backend
            # A plain-function handler gets the direct messages where the subscription hands them over.
            direct: Handler = self._enqueue if self._inline is None else self._handle_inline
            if isinstance(backend, MultiplexesInboxes):
                # One set of connections per Bus for every agent (squadbus.core.inbox_source).
                handler = direct if bus.tracer is None else bus.tracer.handler(direct, self._direct)
                raw = wrap(handler, opts, backend.publish, bus.stats)
                self._shared = await backend.open_inbox(self.agent_id, raw, group=self.group, options=opts)
            else:
                self._subs.append(await bus.subscribe(self._direct, direct, group=self.group, options=opts))
            if self._broadcasts:
                on_failure = failure_policy(self._options, bus.backend.publish, bus.stats)
                for subject in self._broadcasts:
                    await bus.broadcast_hub.join(subject, self, on_failure)
            if self._handler is not None and self._inline is None:
                self._runner = asyncio.create_task(self._run(self._handler), name=f"inbox-{self.agent_id}")
        except BaseException:
            await self.close()
            raise
        return self

    async def _enqueue(self, delivery: Delivery) -> None:
        if not self.offer(delivery):
            await self._give_back(delivery)
            return
        waiter = delivery.settled_future()
        await waiter
        # Settled: drop the resolved future, which the agent would keep alive with the delivery it holds
        # while it waits for the next (one more object per agent for every full collection, issue 15).
        if delivery._waiter is waiter:
            delivery._waiter = None

    def offer(self, delivery: Delivery, wakeups: Wakeups | None = None) -> bool:
        """Queue ``delivery`` for the agent without waiting for it to be settled (broadcast copies), or
        hand it to a plain-function handler now; False if the inbox is not open. With ``wakeups`` (a
        fan-out to many inboxes) the agent's task is woken when the batch is flushed."""
        if not self._open:
            return False
        if self._inline is not None:
            self._deliver_inline(delivery)
            return True
        self._queue.put_nowait(delivery, wakeups)
        return True

    # ---- with a handler ---------------------------------------------------------------------------

    def _check_returned(self, returned: object) -> None:
        """What a plain-function handler returned, other than None: an awaitable is a mistake, said clearly."""
        if inspect.isawaitable(returned):
            if inspect.iscoroutine(returned):
                returned.close()  # not awaited, and no "never awaited" warning on top of the error
            raise ConfigError(
                f"the handler of the inbox of {self.agent_id} returned an awaitable: a plain function is called "
                "inline and must not await; pass an 'async def' to have it run by the inbox's task"
            )

    def _returned(self, delivery: Delivery, returned: object) -> None:
        """Settle ``delivery`` (a broadcast copy) whose plain-function handler returned ``returned``: ack it
        unless the handler settled it; an awaitable returned fails it. A settle that needs I/O (a failure's
        nack or dead letter) runs as a task of the inbox, which closing waits for."""
        if returned is not None:
            try:
                self._check_returned(returned)
            except ConfigError as exc:
                self._settle_later(delivery.fail(exc))
                return
        if delivery._settled is None:
            pending = delivery.ack_soon()
            if pending is not None:
                self._settle_later(pending)

    async def _handle_inline(self, delivery: Delivery) -> None:
        """The direct subscription's handler with a plain-function handler (the Bus's wrapper settles)."""
        assert self._inline is not None
        returned = self._inline(delivery)
        if returned is not None:
            self._check_returned(returned)

    def _deliver_inline(self, delivery: Delivery) -> None:
        """Run the plain-function handler on ``delivery`` (a broadcast copy) and settle it by the outcome."""
        assert self._inline is not None
        try:
            returned = self._inline(delivery)
        except Exception as exc:
            self._settle_later(delivery.fail(exc))
            return
        self._returned(delivery, returned)

    def _settle_later(self, settling: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(settling)
        self._settling.add(task)
        task.add_done_callback(self._settled_later)

    def _settled_later(self, task: asyncio.Task[object]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("inbox of %s: settling a delivery failed: %s", self.agent_id, error, exc_info=error)

    async def _run(self, handler: InboxHandler) -> None:
        """The task of an inbox with an ``async def`` handler: one delivery at a time, settled by the outcome."""
        while True:
            try:
                delivery = await self._anext()
            except StopAsyncIteration:
                return
            async with delivery:
                try:
                    await handler(delivery)  # type: ignore[misc]  # an async def (is_async_handler)
                except asyncio.CancelledError:
                    if delivery.settled is None:
                        # Given back with the backoff, as close() does: the direct subscription may still be
                        # handing out, and a message back at once would be refused here again, an attempt lost.
                        await self._give_back(delivery)
                    raise

    async def close(self) -> None:
        """Stop receiving (idempotent): unsettled deliveries are nacked, loops waiting on the inbox end.

        The nack waits for the backoff (``options.backoff(attempt)``), not 0:
        the subscriptions may still fetch while they stop, and a message given
        back at once would come straight back here and be nacked again, an
        attempt lost each time. Closing is bounded by the Bus's ``close_timeout``.
        """
        if not self._open:
            return
        self._open = False
        current, self._current = self._current, None
        # The delivery an async handler has in hand is its to finish (below), not to be nacked under it.
        unsettled = [current] if current is not None and current.settled is None and self._runner is None else []
        queue = self._queue
        while not queue.empty():
            pending = queue.get_nowait()
            if pending is not None:
                unsettled.append(pending)
        queue.put_nowait(None)
        for delivery in unsettled:
            await self._give_back(delivery)
        await self._stop_handler()
        subs, self._subs = self._subs, []
        shared, self._shared = self._shared, None
        leaving = [self._bus.broadcast_hub.leave(subject, self) for subject in self._broadcasts]
        if shared is not None:
            leaving.append(shared.close())
        await asyncio.gather(*(self._bus.unsubscribe(sub) for sub in subs), *leaving)

    async def _give_back(self, delivery: Delivery) -> None:
        await delivery.nack(self._options.backoff(delivery.attempt))

    async def _stop_handler(self) -> None:
        """Let an async handler finish the delivery in hand (up to the Bus's ``close_timeout``, then cancel
        it: the delivery is nacked), and wait for the settles a plain-function handler left running."""
        runner, self._runner = self._runner, None
        if runner is not None and runner is not asyncio.current_task():  # not closed from its own handler
            try:
                await asyncio.wait({runner}, timeout=self._bus.close_timeout)
            finally:
                if not runner.done():
                    logger.warning("inbox of %s: its handler did not finish within close_timeout=%ss; cancelled",
                                   self.agent_id, self._bus.close_timeout)
                    await cancel_and_wait(runner)
        if self._settling:
            await wait_ended(*self._settling)

    async def __aenter__(self) -> Inbox:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._handler is not None:
            raise ConfigError(
                f"the inbox of {self.agent_id} has a handler: it gets the deliveries, the inbox is not iterated"
            )
        if not self._open:
            raise Closed(
                f"the inbox of {self.agent_id} is not open: use 'async with bus.inbox(...) as inbox:' "
                "or 'await inbox.open()' first"
            )

    def __aiter__(self) -> Inbox:
        self._check_open()
        return self

    def __anext__(self) -> Awaitable[Delivery]:
        # A plain method returning an awaitable that waits without a coroutine (_NextDelivery); the
        # coroutine _next only when a delivery is left unsettled (failing it is asynchronous) or when
        # the inbox is not open.
        current = self._current
        if not self._open or (current is not None and current.settled is None):
            return self._next(iterating=True)
        waiter = self._next_delivery
        if waiter.busy:  # another loop waits on this inbox with it
            waiter = _NextDelivery(self)
        waiter.busy = True
        return waiter  # type: ignore[return-value]

    _anext = __anext__  # the task of an inbox with an async handler iterates with it (__aiter__ refuses)

    async def get(self, timeout: float | None = None) -> Delivery:
        """The next delivery; raises :class:`~squadbus.core.errors.ReceiveTimeout` after ``timeout`` seconds.

        Raises :class:`~squadbus.core.errors.Closed` if the inbox is not open or closes while waiting.
        """
        self._check_open()
        await self._fail_unsettled()
        try:
            async with asyncio.timeout(timeout):
                return await self._next()
        except TimeoutError as exc:
            raise ReceiveTimeout(f"nothing arrived in the inbox of {self.agent_id} within {timeout}s") from exc

    async def _next(self, *, iterating: bool = False) -> Delivery:
        """The next delivery. ``iterating``: for ``async for`` (StopAsyncIteration once closed)."""
        if not self._open:
            if iterating:
                raise StopAsyncIteration
            self._check_open()
        current = self._current
        if current is not None and current.settled is None:
            try:
                await self._fail_unsettled()
            except Closed:
                if iterating:
                    raise StopAsyncIteration from None
                raise
        queue = self._queue
        while queue.empty():
            fut = queue.waiter()
            try:
                await fut
            except asyncio.CancelledError:
                queue.gave_up(fut)
                raise
        delivery = queue.get_nowait()
        if delivery is None:
            queue.put_nowait(None)  # for the next waiting loop
            if iterating:
                raise StopAsyncIteration
            raise Closed(f"the inbox of {self.agent_id} was closed")
        self._current = delivery
        return delivery

    async def _fail_unsettled(self) -> None:
        current, self._current = self._current, None
        if current is None or current.settled is not None:
            return
        logger.warning(
            "inbox of %s: message %s (attempt %d) was left unsettled when the next one was asked for; "
            "it will be redelivered (settle it with 'async with delivery:' or ack/nack)",
            self.agent_id, current.message.id, current.attempt,
        )
        await current.fail(Nack("left unsettled by the agent"))
