"""The core consumer runtime (squadbus.core.consumer) over a source of deliveries held in a list: order,
in-flight limit, batches, fairness to the loop, close, and the settling of what a bare handler leaves."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from squadbus.core import consumer as consumer_module
from squadbus.core import envelope
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.consumer import FAIRNESS_STREAK, Consumer
from squadbus.core.errors import Closed


class _Delivery(Delivery):
    __slots__ = ("nacks",)

    def __init__(self, number: int) -> None:
        super().__init__(envelope.build(subject="agent.message.a", sender_id="pm", content=str(number)))
        self.nacks: list[float] = []

    def _ack(self) -> None:
        return None

    def _nack(self, delay: float) -> None:
        self.nacks.append(delay)


class _ListSource:
    """A DeliverySource over a list: what ``add`` puts in comes out in order."""

    def __init__(self) -> None:
        self.ready: deque[Delivery] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.given_back: list[Delivery] = []
        self.closed = False
        self.fail_next: Exception | None = None

    @property
    def pattern(self) -> str:
        return "agent.message.a"

    @property
    def group(self) -> str | None:
        return "g"

    def add(self, *deliveries: Delivery) -> None:
        self.ready.extend(deliveries)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def poll(self, max_count: int) -> Sequence[Delivery]:
        return [self.ready.popleft() for _ in range(min(max_count, len(self.ready)))]

    async def receive(self, max_count: int, wait: float) -> Sequence[Delivery]:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        if self.closed:
            raise Closed("closed")
        if not self.ready:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(None if wait == math.inf else wait):
                    await self.waiter
            except TimeoutError:
                return ()
        return self.poll(max_count)

    def give_back(self, deliveries: Sequence[Delivery]) -> None:
        self.given_back.extend(deliveries)

    async def close(self) -> None:
        self.closed = True


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


def _numbers(deliveries: Sequence[Delivery]) -> list[int]:
    return [int(d.message.content) for d in deliveries]


async def test_one_at_a_time_in_order_each_awaited_before_the_next() -> None:
    source = _ListSource()
    running = 0
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal running
        running += 1
        assert running == 1, "a second delivery was handed over while the first was in progress"
        await asyncio.sleep(0)
        seen.append(delivery)
        await delivery.ack()
        running -= 1

    consumer = Consumer(source, ConsumerOptions(), handler=handler)
    consumer.start("test")
    source.add(*(_Delivery(n) for n in range(5)))
    await _until(lambda: len(seen) == 5)
    source.add(*(_Delivery(n) for n in range(5, 8)))  # after it waited
    await _until(lambda: len(seen) == 8)
    assert _numbers(seen) == list(range(8))
    await consumer.close()
    assert source.closed


async def test_max_in_flight_runs_that_many_at_once_started_in_order() -> None:
    source = _ListSource()
    started: list[Delivery] = []
    release = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        started.append(delivery)
        await release.wait()
        await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(max_in_flight=3), handler=handler)
    consumer.start("test")
    deliveries = [_Delivery(n) for n in range(7)]
    source.add(*deliveries)
    await _until(lambda: len(started) == 3)
    for _ in range(10):
        await asyncio.sleep(0)
    assert _numbers(started) == [0, 1, 2], "no fourth call while three are in progress"
    release.set()
    await _until(lambda: len(started) == 7)
    assert _numbers(started) == list(range(7))
    await consumer.close()
    assert all(d.settled == "ack" for d in deliveries)


def _workers(name: str) -> int:
    return sum(1 for task in asyncio.all_tasks() if task.get_name().startswith(f"{name}-worker"))


async def test_max_in_flight_starts_workers_as_needed_not_a_task_per_delivery() -> None:
    loop = asyncio.get_running_loop()
    created = 0
    factory = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        nonlocal created
        created += 1
        return factory(loop, coro, **kwargs) if factory is not None else asyncio.Task(coro, loop=loop, **kwargs)

    source = _ListSource()
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        await asyncio.sleep(0)
        handled.append(int(delivery.message.content))
        await delivery.ack()

    loop.set_task_factory(counting)
    try:
        consumer = Consumer(source, ConsumerOptions(max_in_flight=3), handler=handler)
        consumer.start("test")
        source.add(*(_Delivery(n) for n in range(50)))
        await _until(lambda: len(handled) == 50)
        assert created <= 1 + 3 + 2, f"{created} tasks: the consumer's and its workers, not one per delivery"
        await _until(lambda: _workers("test") == 1)  # idle: one worker waits on the source, the others ended
    finally:
        loop.set_task_factory(factory)
    await consumer.close()
    assert sorted(handled) == list(range(50))
    assert _workers("test") == 0


async def test_close_with_max_in_flight_stops_idle_workers_and_lets_busy_ones_finish() -> None:
    source = _ListSource()
    release = asyncio.Event()
    started: list[int] = []

    async def handler(delivery: Delivery) -> None:
        started.append(int(delivery.message.content))
        await release.wait()
        await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(max_in_flight=3), handler=handler)
    consumer.start("test")
    first, second = _Delivery(1), _Delivery(2)
    source.add(first, second)
    await _until(lambda: len(started) == 2)  # the third worker waits on the source
    closing = asyncio.ensure_future(consumer.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done() and not source.closed, "close waits for the two handlers in progress"
    source.add(_Delivery(3))
    release.set()
    await asyncio.wait_for(closing, 5)
    assert first.settled == "ack" and second.settled == "ack" and started == [1, 2]
    assert source.closed and _numbers(source.ready) == [3], "nothing more is pulled once closing"


async def test_batches_take_what_is_ready_up_to_batch_size_then_wait_for_more() -> None:
    source = _ListSource()
    batches: list[list[int]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        batches.append(_numbers(deliveries))
        for delivery in deliveries:
            await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(batch_size=4), batches=handler, max_wait=60)
    consumer.start("test")
    source.add(*(_Delivery(n) for n in range(6)))
    await _until(lambda: len(batches) == 1)
    assert batches == [[0, 1, 2, 3]], "a full batch goes at once"
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(batches) == 1, "the next batch waits up to max_wait to fill"
    source.add(_Delivery(6), _Delivery(7))
    await _until(lambda: len(batches) == 2)
    assert batches[1] == [4, 5, 6, 7]
    await consumer.close()


async def test_a_batch_not_full_goes_when_max_wait_passed() -> None:
    source = _ListSource()
    batches: list[list[int]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        batches.append(_numbers(deliveries))

    consumer = Consumer(source, ConsumerOptions(batch_size=100), batches=handler, max_wait=0.01)
    consumer.start("test")
    delivery = _Delivery(1)
    source.add(delivery, _Delivery(2))
    await _until(lambda: len(batches) == 1)
    assert batches == [[1, 2]]
    await consumer.close()
    assert delivery.settled == "nack", "what the batch handler left unsettled is nacked"


async def test_close_while_a_batch_fills_gives_it_back_in_order_unsettled() -> None:
    source = _ListSource()

    async def handler(deliveries: Sequence[Delivery]) -> None:
        raise AssertionError("closed before its batch was complete")

    consumer = Consumer(source, ConsumerOptions(batch_size=4), batches=handler, max_wait=60)
    consumer.start("test")
    deliveries = [_Delivery(1), _Delivery(2)]
    source.add(*deliveries)
    await _until(lambda: not source.ready and consumer._waiting)
    await consumer.close()
    assert source.given_back == deliveries
    assert all(d.settled is None for d in deliveries)
    assert source.closed


class _AheadSource(_ListSource):
    """A source that asks the consumer to gather the next batch while the handler runs (NATS)."""

    gathers_ahead = True

    def __init__(self) -> None:
        super().__init__()
        self.polls: list[int] = []

    def poll(self, max_count: int) -> Sequence[Delivery]:
        got = super().poll(max_count)
        if got:
            self.polls.append(len(got))
        return got


async def test_a_source_that_gathers_ahead_gets_the_next_batch_taken_in_slices_while_the_handler_runs() -> None:
    source = _AheadSource()
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        batches.append(_numbers(deliveries))
        if len(batches) == 1:
            await release.wait()
        for delivery in deliveries:
            await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(batch_size=40), batches=handler, max_wait=0)
    consumer.start("test")
    source.add(*(_Delivery(n) for n in range(40)))
    await _until(lambda: len(batches) == 1)
    source.add(*(_Delivery(n) for n in range(40, 80)))
    await _until(lambda: not source.ready)
    assert len(batches) == 1, "the next batch waits for the handler of the current one"
    assert source.polls[1:] == [16, 16, 8], "taken in slices while the handler runs (the first by receive)"
    release.set()
    await _until(lambda: len(batches) == 2)
    assert batches == [list(range(40)), list(range(40, 80))]
    await consumer.close()


async def test_close_gives_back_a_batch_gathered_ahead_and_lets_the_running_one_finish() -> None:
    source = _AheadSource()
    release = asyncio.Event()
    batches: list[list[int]] = []

    async def handler(deliveries: Sequence[Delivery]) -> None:
        batches.append(_numbers(deliveries))
        await release.wait()
        for delivery in deliveries:
            await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(batch_size=2), batches=handler, max_wait=0)
    consumer.start("test")
    first = [_Delivery(1), _Delivery(2)]
    source.add(*first)
    await _until(lambda: len(batches) == 1)
    ahead = [_Delivery(3), _Delivery(4)]
    source.add(*ahead)
    await _until(lambda: not source.ready)
    closing = asyncio.ensure_future(consumer.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done(), "close waits for the batch in progress"
    release.set()
    await closing
    assert batches == [[1, 2]] and all(d.settled == "ack" for d in first)
    assert source.given_back == ahead and all(d.settled is None for d in ahead)
    assert source.closed


async def test_close_lets_the_handler_in_progress_finish_and_settle_first() -> None:
    source = _ListSource()
    entered = asyncio.Event()
    release = asyncio.Event()
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        entered.set()
        await release.wait()
        handled.append(int(delivery.message.content))
        await delivery.ack()

    consumer = Consumer(source, ConsumerOptions(), handler=handler)
    consumer.start("test")
    first, second = _Delivery(1), _Delivery(2)
    source.add(first, second)
    await entered.wait()
    closing = asyncio.ensure_future(consumer.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done() and not source.closed, "close waits for the handler in progress"
    release.set()
    await closing
    assert handled == [1] and first.settled == "ack"
    assert second.settled is None and list(source.ready) == [second], "nothing more is pulled once closing"


def _hanging_consumer(route: str, source: _ListSource, started: list[Delivery]) -> Consumer:
    """A consumer on ``route`` whose handler (or batch handler) never returns unless cancelled."""

    async def handler(delivery: Delivery) -> None:
        started.append(delivery)
        await asyncio.Event().wait()

    async def batch(deliveries: Sequence[Delivery]) -> None:
        started.extend(deliveries)
        await asyncio.Event().wait()

    if route == "one at a time":
        return Consumer(source, ConsumerOptions(), handler=handler)
    if route == "max_in_flight":
        return Consumer(source, ConsumerOptions(max_in_flight=2), handler=handler)
    return Consumer(source, ConsumerOptions(batch_size=2), batches=batch, max_wait=0)


@pytest.mark.parametrize("route", ["one at a time", "max_in_flight", "batches", "batches gathered ahead"])
async def test_cancelling_a_close_raises_cancelled_and_still_closes(route: str) -> None:
    # e.g. asyncio.wait_for(bus.close(), t) timing out while a handler hangs: the caller is cancelled, not the
    # close swallowing it; the hanging handlers are cancelled (what they left unsettled is nacked), the source
    # closes.
    source = _AheadSource() if route == "batches gathered ahead" else _ListSource()
    started: list[Delivery] = []
    consumer = _hanging_consumer(route, source, started)
    consumer.start("test")
    source.add(*(_Delivery(n) for n in range(2)))
    await _until(lambda: len(started) == (1 if route == "one at a time" else 2))
    closing = asyncio.ensure_future(consumer.close())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not closing.done(), "close waits for the handlers in progress"
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    task = consumer._task
    assert task is not None and task.done()
    assert _workers("test") == 0
    assert [d.settled for d in started] == ["nack"] * len(started)
    assert source.closed


async def _handled_when_others_ran(source: _ListSource, count: int, batch_size: int = 0) -> list[int]:
    """Hand ``count`` deliveries to a handler (a batch handler when ``batch_size``) that never suspends; how
    many it had handled each time another task ran meanwhile."""
    handled = 0
    handled_when_other_ran: list[int] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal handled
        handled += 1
        delivery.ack_soon()

    async def batches(deliveries: Sequence[Delivery]) -> None:
        nonlocal handled
        handled += len(deliveries)
        for delivery in deliveries:
            delivery.ack_soon()

    async def other() -> None:
        while handled < count:
            handled_when_other_ran.append(handled)
            await asyncio.sleep(0)

    source.add(*(_Delivery(n) for n in range(count)))
    if batch_size:
        consumer = Consumer(source, ConsumerOptions(batch_size=batch_size), batches=batches)
    else:
        consumer = Consumer(source, ConsumerOptions(), handler=handler)
    consumer.start("test")
    await asyncio.gather(other(), _until(lambda: handled == count))
    await consumer.close()
    return handled_when_other_ran


async def test_a_handler_that_never_suspends_does_not_starve_the_loop() -> None:
    count = FAIRNESS_STREAK * 4
    handled_when_other_ran = await _handled_when_others_ran(_ListSource(), count)
    assert any(0 < n < count for n in handled_when_other_ran), handled_when_other_ran


async def test_a_source_names_how_many_deliveries_go_in_a_row_before_the_consumer_yields() -> None:
    source = _ListSource()
    source.fairness_streak = 8  # type: ignore[attr-defined]
    handled_when_other_ran = await _handled_when_others_ran(source, 32)
    # It yields every 8th delivery, once taken and before its handler: others run after 7, 15, ... handled.
    assert {n for n in handled_when_other_ran if 0 < n < 32} == {7, 15, 23, 31}, handled_when_other_ran


@pytest.mark.parametrize("route", ["one at a time", "max_in_flight", "batches"])
async def test_cancelled_at_its_fairness_yield_the_consumer_gives_back_what_it_took(route: str) -> None:
    # Its tasks cancelled while they yield (the loop shutting down cancels every task): the deliveries taken
    # for the next handler call go back to the source, not left in flight.
    source = _ListSource()
    source.fairness_streak = 1  # type: ignore[attr-defined]
    handled: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery)
        delivery.ack_soon()

    async def batches(deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            await handler(delivery)

    if route == "batches":
        consumer = Consumer(source, ConsumerOptions(batch_size=2), batches=batches)
    else:
        consumer = Consumer(source, ConsumerOptions(max_in_flight=2 if route == "max_in_flight" else 1),
                            handler=handler)
    source.add(*(_Delivery(n) for n in range(8)))
    consumer.start("test")
    await _until(lambda: len(handled) >= 1)
    while tasks := [task for task in asyncio.all_tasks() if task.get_name().startswith("test")]:
        for task in tasks:
            task.cancel()  # a worker may start meanwhile (the one a busy worker asked for): cancelled next round
        await asyncio.wait(tasks)
    assert sorted(_numbers([*handled, *source.given_back, *source.ready])) == list(range(8))
    assert source.given_back and all(d.settled is None for d in source.given_back)
    await consumer.close()


@pytest.mark.parametrize("ahead", [False, True], ids=["batches", "batches gathered ahead"])
async def test_a_batch_handler_that_never_suspends_does_not_starve_the_loop(ahead: bool) -> None:
    count = FAIRNESS_STREAK * 4
    source = _AheadSource() if ahead else _ListSource()
    handled_when_other_ran = await _handled_when_others_ran(source, count, batch_size=4)
    assert any(0 < n < count for n in handled_when_other_ran), handled_when_other_ran


async def test_batches_yield_once_the_source_s_fairness_streak_of_deliveries_went_in_a_row() -> None:
    source = _ListSource()
    source.fairness_streak = 8  # type: ignore[attr-defined]
    handled_when_other_ran = await _handled_when_others_ran(source, 32, batch_size=4)
    # A yield once a batch brings the streak to 8 or more, before its handler: others run after 4, 12, 20, 28.
    assert {n for n in handled_when_other_ran if 0 < n < 32} == {4, 12, 20, 28}, handled_when_other_ran


@pytest.mark.parametrize("raises", [False, True])
async def test_what_a_bare_handler_leaves_unsettled_is_nacked_with_the_backoff(raises: bool) -> None:
    source = _ListSource()
    options = ConsumerOptions(backoff_base=0.25)

    async def handler(delivery: Delivery) -> None:
        if raises:
            raise RuntimeError("boom")

    consumer = Consumer(source, options, handler=handler)
    consumer.start("test")
    delivery = _Delivery(1)
    source.add(delivery)
    await _until(lambda: delivery.settled is not None)
    assert delivery.settled == "nack" and delivery.nacks == [options.backoff(1)]
    await consumer.close()


async def test_a_closed_source_ends_the_consumer() -> None:
    source = _ListSource()
    source.fail_next = Closed("the backend closed")

    async def handler(delivery: Delivery) -> None:
        raise AssertionError("nothing to hand over")

    consumer = Consumer(source, ConsumerOptions(), handler=handler)
    consumer.start("test")
    task = consumer._task
    assert task is not None
    await asyncio.wait_for(task, 5)
    await consumer.close()


def test_a_consumer_needs_exactly_one_handler() -> None:
    source = _ListSource()

    async def handler(delivery: Delivery) -> None: ...

    async def batch(deliveries: Sequence[Delivery]) -> None: ...

    with pytest.raises(ValueError, match="not both"):
        Consumer(source, ConsumerOptions())
    with pytest.raises(ValueError, match="not both"):
        Consumer(source, ConsumerOptions(), handler=handler, batches=batch)
    with pytest.raises(ValueError, match="max_wait"):
        Consumer(source, ConsumerOptions(), batches=batch, max_wait=-1)


async def test_a_source_failing_unexpectedly_is_logged_and_asked_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(consumer_module, "_RETRY_SOURCE", 0.001)
    source = _ListSource()
    source.fail_next = ConnectionError("broker gone for a moment")
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(int(delivery.message.content))

    consumer = Consumer(source, ConsumerOptions(), handler=handler)
    consumer.start("test")
    await _until(lambda: source.fail_next is None)
    source.add(_Delivery(1))
    await _until(lambda: handled == [1])
    assert "broker gone for a moment" in caplog.text
    await consumer.close()


async def test_a_cancelled_close_of_a_memory_subscription_still_leaves_its_group() -> None:
    # MemorySubscription.close() leaves the group after the runtime's close: also when that raised
    # CancelledError (a member left behind would keep counting for the group's admission of publishers).
    from squadbus.backends.memory.subscription import MemorySubscription
    from squadbus.core.bus import Bus

    entered = asyncio.Event()

    async def hangs(delivery: Delivery) -> None:
        entered.set()
        await asyncio.Event().wait()

    async with Bus.from_url("memory://") as bus:
        sub = await bus.subscribe("agent.message.a", hangs, group="g")
        assert isinstance(sub, MemorySubscription)
        group = sub._group
        await bus.publish(envelope.build(subject="agent.message.a", sender_id="pm", content="1"))
        await asyncio.wait_for(entered.wait(), 5)
        closing = asyncio.ensure_future(sub.close())
        for _ in range(5):
            await asyncio.sleep(0)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert sub not in group.members
