"""Inbox semantics on the memory backend: opening, typed timeouts, settling with ``async with``, closing.

Redelivery after a failure and leaving ``async with Bus`` while an agent holds a delivery are
in the conformance suite (every backend); these are the API rules that need no broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from squadbus.backends.memory import MemoryBackend
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import BackendError, Closed, ReceiveTimeout, SquadbusError

WAIT = 5.0


class _FailingClose(MemoryBackend):
    async def close(self) -> None:
        await super().close()
        raise BackendError("flush failed")


async def _settles(delivery: Delivery) -> str:
    return await asyncio.wait_for(delivery.settled_future(), WAIT)


async def test_iterating_an_inbox_that_is_not_open_raises() -> None:
    async with Bus.from_url("memory://") as bus:
        await bus.send("pm", "dev-1", "waiting for you")
        with pytest.raises(Closed, match="not open"):
            async for _ in bus.inbox("dev-1"):
                pytest.fail("an inbox that is not open delivered something")
        inbox = bus.inbox("dev-1")
        with pytest.raises(Closed, match="not open"):
            await inbox.get(WAIT)
        async with inbox:
            first = await inbox.get(WAIT)
            assert first.message.content == "waiting for you"
            await first.ack()
        with pytest.raises(Closed, match="not open"):
            await inbox.get(WAIT)


async def test_get_timeout_raises_the_typed_error() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1") as inbox:
        with pytest.raises(ReceiveTimeout) as caught:
            await inbox.get(timeout=0.05)
        assert isinstance(caught.value, SquadbusError) and isinstance(caught.value, TimeoutError)


async def test_asking_for_the_next_nacks_an_unsettled_delivery_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ConsumerOptions(backoff_base=0.0, backoff_max=0.0)
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False, options=options) as inbox:
        sent = await bus.send("pm", "dev-1", "forgotten")
        first = await inbox.get(WAIT)
        with caplog.at_level(logging.WARNING, logger="squadbus.inbox"):
            again = await inbox.get(WAIT)
        assert first.settled == "nack"
        assert again.message.id == sent.id and again.attempt == 2
        assert any("left unsettled" in r.getMessage() and str(sent.id) in r.getMessage() for r in caplog.records)
        await again.ack()


async def test_async_with_delivery_acks_on_success_and_keeps_an_explicit_settle() -> None:
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False) as inbox:
        await bus.send("pm", "dev-1", "one")
        await bus.send("pm", "dev-1", "two")
        async with await inbox.get(WAIT) as delivery:
            pass
        assert delivery.settled == "ack"
        async with await inbox.get(WAIT) as second:
            assert await second.nack(0.0) is True
        assert second.settled == "nack", "the first settle wins"
        again = await inbox.get(WAIT)
        assert again.message.content == "two" and again.attempt == 2
        await again.ack()


async def test_async_with_delivery_nacks_at_once_and_propagates_on_cancel() -> None:
    options = ConsumerOptions(backoff_base=60.0, backoff_max=60.0)
    async with Bus.from_url("memory://") as bus, bus.inbox("dev-1", broadcasts=False, options=options) as inbox:
        sent = await bus.send("pm", "dev-1", "interrupted")
        started = asyncio.Event()

        async def work() -> None:
            async with await inbox.get(WAIT):
                started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(work())
        await asyncio.wait_for(started.wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await inbox.get(WAIT)
        assert again.message.id == sent.id and again.attempt == 2, "redelivered at once, not after the backoff"
        await again.ack()


async def test_async_with_delivery_outside_a_bus_nacks_and_propagates() -> None:
    class Bare(Delivery):
        def _ack(self) -> None:
            return None

        def _nack(self, delay: float) -> None:
            return None

    delivery = Bare(envelope.build(subject=subjects.direct("a"), sender_id="pm", content="x"))
    with pytest.raises(ValueError, match="no policy"):
        async with delivery:
            raise ValueError("no policy here")
    assert delivery.settled == "nack"


async def test_closing_an_inbox_ends_a_waiting_loop() -> None:
    async with Bus.from_url("memory://") as bus:
        inbox = await bus.inbox("dev-1").open()
        received: list[Delivery] = []

        async def work() -> None:
            async for delivery in inbox:
                received.append(delivery)

        task = asyncio.create_task(work())
        await asyncio.sleep(0.05)
        await inbox.close()
        await asyncio.wait_for(task, WAIT)
        assert received == []


async def test_closing_the_bus_nacks_what_an_agent_holds_and_closes_its_inbox() -> None:
    backend = MemoryBackend()
    await backend.connect()
    try:
        bus = await Bus(backend, owns_backend=False).start()
        inbox = await bus.inbox("dev-1", broadcasts=False).open()
        await bus.send("pm", "dev-1", "held")
        held = await inbox.get(WAIT)
        await asyncio.wait_for(bus.close(), WAIT)
        assert held.settled == "nack"
        with pytest.raises(Closed):
            await inbox.get(WAIT)
        async with Bus(backend, owns_backend=False) as other, other.inbox("dev-1", broadcasts=False) as again:
            back = await again.get(WAIT)
            assert back.message.content == "held" and back.attempt == 2
            await back.ack()
    finally:
        await backend.close()


async def test_bus_close_is_bounded_when_a_handler_never_returns(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    await backend.connect()
    try:
        bus = await Bus(backend, owns_backend=False, close_timeout=0.2).start()
        started = asyncio.Event()
        seen: list[int] = []

        async def stuck(delivery: Delivery) -> None:
            seen.append(delivery.attempt)
            started.set()
            await asyncio.Event().wait()

        await bus.subscribe(subjects.direct("dev-1"), stuck, group="stuck")
        await bus.send("pm", "dev-1", "never finishes")
        await asyncio.wait_for(started.wait(), WAIT)
        with caplog.at_level(logging.ERROR, logger="squadbus.bus"):
            await asyncio.wait_for(bus.close(), WAIT)
        assert any("did not finish" in r.getMessage() for r in caplog.records)
        done: list[int] = []

        async def finish(delivery: Delivery) -> None:
            done.append(delivery.attempt)

        async with Bus(backend, owns_backend=False) as other:
            await other.subscribe(subjects.direct("dev-1"), finish, group="stuck")
            await asyncio.wait_for(_until(lambda: bool(done)), WAIT)
        assert seen == [1] and done == [2], "the stuck delivery was nacked when its handler was cancelled"
    finally:
        await backend.close()


async def test_leaving_the_bus_never_replaces_the_agents_error(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus(_FailingClose())
    with caplog.at_level(logging.ERROR, logger="squadbus.bus"), pytest.raises(RuntimeError, match="agent failed"):
        async with bus:
            raise RuntimeError("agent failed")
    assert any(r.exc_info and "flush failed" in str(r.exc_info[1]) for r in caplog.records)
    with pytest.raises(BackendError, match="flush failed"):
        async with Bus(_FailingClose()):
            pass


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


async def test_where_broadcasts_are_kept_apart_the_hub_reads_the_squad_and_the_domains_apart() -> None:
    """A backend that keeps broadcasts apart (Kafka's broadcast topic) serves a broadcasts-only pattern without
    reading direct messages: the hub then holds ``agent.message.broadcast`` and ``agent.message.domain.>``
    (however many domains) instead of ``agent.message.>``, and each broadcast still reaches its inboxes once."""
    backend = MemoryBackend()
    backend.literal_subscriptions_cheap = False  # type: ignore[attr-defined]
    backend.broadcasts_apart = True  # type: ignore[attr-defined]
    subscribed: list[str] = []
    subscribe = backend.subscribe

    async def recording(pattern: str, *args: Any, **kwargs: Any) -> Any:
        subscribed.append(pattern)
        return await subscribe(pattern, *args, **kwargs)

    backend.subscribe = recording  # type: ignore[method-assign]
    async with Bus(backend) as bus:
        dev = await bus.inbox("dev-1", domains=("dev",)).open()
        sales = await bus.inbox("sales-1", domains=("sales", "support")).open()
        assert sorted(subscribed) == ["agent.message.broadcast", "agent.message.domain.>"]
        assert bus.broadcast_hub.subscriptions == 2
        squad = await bus.broadcast("pm", "all hands")
        to_dev = await bus.broadcast("pm-dev", "dev only", domain="dev")
        to_support = await bus.broadcast("pm-support", "support only", domain="support")
        direct = await bus.send("pm", "dev-1", "just you")
        got: dict[str, set[Any]] = {"dev-1": set(), "sales-1": set()}
        for inbox, name, count in ((dev, "dev-1", 3), (sales, "sales-1", 2)):
            for _ in range(count):
                got[name].add((delivery := await inbox.get(2)).message.id)
                await delivery.ack()
            with pytest.raises(ReceiveTimeout):
                await inbox.get(0.2)
        assert got == {"dev-1": {squad.id, to_dev.id, direct.id}, "sales-1": {squad.id, to_support.id}}
        await sales.close()
        assert bus.broadcast_hub.subscriptions == 2  # dev still listens to both
        await dev.close()
        assert bus.broadcast_hub.subscriptions == 0


async def test_where_literal_subscriptions_are_not_cheap_the_hub_reads_all_broadcasts_once() -> None:
    """A backend whose every subscription reads the whole log (Kafka) says so; the hub then holds one
    subscription for the squad and every domain, copies each broadcast to the inboxes that hear it,
    and lets direct messages pass (they reach their inbox once, through the inbox itself)."""
    backend = MemoryBackend()
    backend.literal_subscriptions_cheap = False  # type: ignore[attr-defined]
    async with Bus(backend) as bus:
        dev = await bus.inbox("dev-1", domains=("dev",)).open()
        sales = await bus.inbox("sales-1", domains=("sales",)).open()
        assert bus.broadcast_hub.subscriptions == 1
        squad = await bus.broadcast("pm", "all hands")
        to_dev = await bus.broadcast("pm-dev", "dev only", domain="dev")
        direct = await bus.send("pm", "sales-1", "just you")
        got_dev: list[Delivery] = []
        got_sales: list[Delivery] = []
        for inbox, got in ((dev, got_dev), (sales, got_sales)):
            for _ in range(2):
                got.append(delivery := await inbox.get(2))
                await delivery.ack()
        assert {d.message.id for d in got_dev} == {squad.id, to_dev.id}
        assert {d.message.id for d in got_sales} == {squad.id, direct.id}
        with pytest.raises(ReceiveTimeout):
            await dev.get(0.2)
        with pytest.raises(ReceiveTimeout):
            await sales.get(0.2)
        await dev.close()
        assert bus.broadcast_hub.subscriptions == 1  # sales still listens
        await sales.close()
        assert bus.broadcast_hub.subscriptions == 0
