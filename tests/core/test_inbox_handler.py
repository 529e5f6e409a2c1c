"""Inboxes with a handler (``bus.inbox(agent, handler=...)``) on the memory backend: what needs no broker.

Delivery, order and retries of both kinds of handler are in the conformance suite (every backend)."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Callable

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_REASON
from squadbus.core.errors import ConfigError

WAIT = 5.0


async def _until(check: object, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_squad_broadcast_to_function_handlers_runs_no_task_per_agent() -> None:
    agents = [f"dev-{n}" for n in range(300)]
    heard: list[str] = []

    def handler_of(agent: str) -> Callable[[Delivery], None]:
        def on_message(delivery: Delivery) -> None:
            heard.append(agent)
        return on_message

    async with Bus.from_url("memory://") as bus:
        inboxes = [await bus.inbox(agent, handler=handler_of(agent)).open() for agent in agents]
        tasks_before = len(asyncio.all_tasks())
        await bus.broadcast("pm", "all hands")
        await _until(lambda: len(heard) == len(agents))
        assert len(asyncio.all_tasks()) <= tasks_before + 2, "no task per agent for a broadcast"
        assert sorted(heard) == sorted(agents)
        await asyncio.sleep(0.1)
        assert len(heard) == len(agents), "each copy handled once, acked"
        for inbox in inboxes:
            await inbox.close()


async def test_an_inbox_with_a_handler_is_not_iterated() -> None:
    def on_message(delivery: Delivery) -> None:
        pass

    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", handler=on_message) as inbox:
        with pytest.raises(ConfigError, match="has a handler"):
            async for _ in inbox:
                pytest.fail("iterated an inbox with a handler")
        with pytest.raises(ConfigError, match="not callable"):
            bus.inbox("dev-2", handler="not a function")  # type: ignore[arg-type]


async def test_a_plain_function_returning_an_awaitable_fails_the_delivery_clearly() -> None:
    async def work(delivery: Delivery) -> None:
        pass

    def starts_work(delivery: Delivery) -> object:  # a plain function handing back a coroutine: a mistake
        return work(delivery)

    dead: list[Delivery] = []

    async def on_dead(delivery: Delivery) -> None:
        dead.append(delivery)

    options = ConsumerOptions(max_deliver=2, backoff_base=0.01, backoff_max=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited" would be a bug
        async with Bus.from_url("memory://") as bus:
            await bus.subscribe(subjects.dead_letter("inbox-dev-1"), on_dead, group="dlq")
            async with bus.inbox("dev-1", broadcasts=False, options=options, handler=starts_work):
                await bus.send("pm", "dev-1", "do it")
                await _until(lambda: bool(dead))
            gc.collect()
    assert "returned an awaitable" in dead[0].message.headers[DLQ_REASON]


async def test_closing_an_async_handler_that_never_finishes_cancels_it_and_gives_the_delivery_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend()
    await backend.connect()
    try:
        bus = await Bus(backend, owns_backend=False, close_timeout=0.2).start()
        started = asyncio.Event()
        cancelled: list[bool] = []

        async def stuck(delivery: Delivery) -> None:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        inbox = await bus.inbox("dev-1", broadcasts=False, handler=stuck).open()
        await bus.send("pm", "dev-1", "never finishes")
        await asyncio.wait_for(started.wait(), WAIT)
        with caplog.at_level(logging.WARNING, logger="squadbus.inbox"):
            await asyncio.wait_for(inbox.close(), WAIT)
        assert cancelled == [True]
        assert any("did not finish within close_timeout" in r.getMessage() for r in caplog.records)
        async with bus.inbox("dev-1", broadcasts=False) as again:
            back = await again.get(WAIT)
            assert (back.message.content, back.attempt) == ("never finishes", 2)
            await back.ack()
        await bus.close()
    finally:
        await backend.close()


async def test_an_async_handler_may_close_its_own_inbox() -> None:
    async with Bus.from_url("memory://") as bus:
        handled: list[str] = []

        async def last_one(delivery: Delivery) -> None:
            handled.append(delivery.message.content)
            await inbox_with_handler.close()

        inbox_with_handler = await bus.inbox("dev-1", broadcasts=False, handler=last_one).open()
        await bus.send("pm", "dev-1", "the last message")
        await _until(lambda: not inbox_with_handler.is_open)
        assert handled == ["the last message"]


async def test_a_function_handler_waiting_on_its_copy_sees_it_acked_when_it_returns() -> None:
    settled: list[asyncio.Future[str]] = []

    def on_message(delivery: Delivery) -> None:
        settled.append(delivery.settled_future())  # e.g. work started elsewhere that waits for the outcome

    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", handler=on_message):
        await bus.broadcast("pm", "all hands")
        await _until(lambda: bool(settled))
        assert await asyncio.wait_for(settled[0], WAIT) == "ack"


async def test_function_handlers_that_keep_their_copies_get_one_copy_each_acked() -> None:
    # A copy its handler returned without keeping is reused for the next inbox (one allocation less per
    # copy); one the handler kept must stay its own: its inbox, its group, its outcome.
    kept: list[tuple[str, Delivery]] = []
    counted: list[str] = []

    def keeper_of(agent: str) -> Callable[[Delivery], None]:
        def on_message(delivery: Delivery) -> None:
            kept.append((agent, delivery))
        return on_message

    def counter_of(agent: str) -> Callable[[Delivery], None]:
        def on_message(delivery: Delivery) -> None:
            counted.append(agent)  # keeps nothing of the delivery
        return on_message

    agents = [f"dev-{n}" for n in range(40)]
    async with Bus.from_url("memory://") as bus:
        inboxes = [bus.inbox(a, handler=keeper_of(a) if n % 3 == 0 else counter_of(a)) for n, a in enumerate(agents)]
        await asyncio.gather(*(inbox.open() for inbox in inboxes))
        sent = await bus.broadcast("pm", "all hands")
        await _until(lambda: len(kept) + len(counted) == len(agents))
        assert sorted(counted) == sorted(a for n, a in enumerate(agents) if n % 3)
        assert len({id(d) for _, d in kept}) == len(kept) == len(agents[::3])
        for agent, delivery in kept:
            assert delivery.message.id == sent.id and delivery.settled == "ack"
            assert delivery.group == next(i for i in inboxes if i.agent_id == agent)._group
        await asyncio.gather(*(inbox.close() for inbox in inboxes))
