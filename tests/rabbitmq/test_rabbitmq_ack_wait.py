"""ConsumerOptions.ack_wait per group member (backends/rabbitmq/subscriber.py): a delivery its handler has
not settled within ack_wait goes to another member; the hung handler's late settle is harmless; a handler
that reports progress (Delivery.in_progress) keeps its delivery."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.backends.rabbitmq.subscriber import RabbitSubscription
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, leases_kept
from squadbus.core.bus import Bus
from squadbus.testing.conformance import Collector, eventually

pytestmark = pytest.mark.rabbitmq

ACK_WAIT = 1.0
BOUND = 15.0
"""How long past ack_wait the test waits: a functional bound (the broker's own consumer_timeout is
30 minutes), not a timing claim."""


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_a_delivery_hung_past_ack_wait_goes_to_the_other_member_and_the_late_ack_is_harmless(
    rabbitmq_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    agent, group = _uid("agent"), _uid("g")
    options = ConsumerOptions(ack_wait=ACK_WAIT, batch_size=10)
    release = asyncio.Event()
    hung_on: list[Delivery] = []
    late_ack: list[bool] = []
    a_handled: list[str] = []

    async def member_a(delivery: Delivery) -> None:
        if not hung_on:
            hung_on.append(delivery)
            await release.wait()  # hung
            late_ack.append(await delivery.ack())
            return
        a_handled.append(delivery.message.content)

    b_got = Collector()
    async with Bus.from_url(rabbitmq_url) as sender, Bus.from_url(rabbitmq_url) as a_bus, \
            Bus.from_url(rabbitmq_url) as b_bus:
        await a_bus.subscribe(subjects.direct(agent), member_a, group=group, options=options)
        m = await sender.send("pm", agent, "m")
        await eventually(lambda: len(hung_on) == 1, 20, "member A holding m")
        await b_bus.subscribe(subjects.direct(agent), b_got, group=group, options=options)
        more = [(await sender.send("pm", agent, f"m{i}")).id for i in range(1, 7)]  # some land behind m on A
        await eventually(lambda: m.id in b_got.ids, ACK_WAIT + BOUND, "m at member B after ack_wait")
        await eventually(lambda: set(more) <= set(b_got.ids), 20, "what A held behind m, at B")
        assert [d.attempt for d in b_got.deliveries if d.message.id == m.id] == [2], "once, its count + 1"
        assert sorted(map(str, b_got.ids)) == sorted(map(str, [m.id, *more])), "nothing lost or doubled"
        direct = {d.message.id for d in b_got.deliveries if d.attempt == 1}
        given_back = [d.message.id for d in b_got.deliveries if d.attempt == 2]
        assert given_back == [m.id, *(i for i in more if i not in direct)], "A's messages come back in order"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="squadbus.backends.rabbitmq"):
            release.set()
            await eventually(lambda: late_ack == [False], 20, "A's handler returning")
            for i in range(400):  # until A (consuming again) gets one; B competes for them
                await sender.send("pm", agent, f"after-{i}")
                if a_handled:
                    break
                await asyncio.sleep(0.05)
            await eventually(lambda: bool(a_handled), 20, "A consuming again after its handler returned")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "the late ack is harmless"


async def test_a_handler_reporting_progress_keeps_its_delivery_past_ack_wait(rabbitmq_url: str) -> None:
    agent, group = _uid("agent"), _uid("g")
    ack_wait = 1.5  # a loop stall of over 1 s (a loaded machine) would let the lease lapse
    options = ConsumerOptions(ack_wait=ack_wait)
    acked: list[bool] = []

    async def slow_but_alive(delivery: Delivery) -> None:
        if delivery.message.content == "slow":
            async with leases_kept([delivery], 0.2):
                await asyncio.sleep(ack_wait * 2)
            acked.append(await delivery.ack())

    b_got = Collector()
    async with Bus.from_url(rabbitmq_url) as sender, Bus.from_url(rabbitmq_url) as a_bus, \
            Bus.from_url(rabbitmq_url) as b_bus:
        await a_bus.subscribe(subjects.direct(agent), slow_but_alive, group=group, options=options)
        await sender.send("pm", agent, "slow")
        await b_bus.subscribe(subjects.direct(agent), b_got, group=group, options=options)
        await eventually(lambda: acked == [True], 20, "A's ack")
        for i in range(4):  # round robin: B gets some of these
            await sender.send("pm", agent, f"later-{i}")
        await eventually(lambda: len(b_got.messages) >= 1, 20, "a later message at B")
    assert "slow" not in [m.content for m in b_got.messages], "A kept its delivery past ack_wait"


async def test_a_batch_hung_past_ack_wait_goes_to_the_other_member(rabbitmq_url: str) -> None:
    agent, group = _uid("agent"), _uid("g")
    options = ConsumerOptions(ack_wait=ACK_WAIT, batch_size=10)
    release = asyncio.Event()
    hung: list[list[Delivery]] = []

    async def hangs(deliveries: Sequence[Delivery]) -> None:
        hung.append(list(deliveries))
        await release.wait()

    b_got = Collector()
    async with Bus.from_url(rabbitmq_url) as sender, Bus.from_url(rabbitmq_url) as a_bus, \
            Bus.from_url(rabbitmq_url) as b_bus:
        await a_bus.subscribe_batch(subjects.direct(agent), hangs, group=group, max_wait=0.2, options=options)
        sent = [(await sender.send("pm", agent, f"m{i}")).id for i in range(5)]
        await eventually(lambda: bool(hung), 20, "member A holding a batch")
        await b_bus.subscribe(subjects.direct(agent), b_got, group=group, options=options)
        await eventually(lambda: set(sent) <= set(b_got.ids), ACK_WAIT + BOUND, "A's batch at member B")
        release.set()
    assert sorted(map(str, b_got.ids)) == sorted(map(str, sent))


async def test_alone_the_member_gets_its_given_back_message_again_after_its_handler_returns(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, group = _uid("agent"), _uid("g")
    release = asyncio.Event()
    attempts: list[int] = []
    given_back: list[bool] = []

    async def hangs_first(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            await release.wait()
            given_back.append(not await delivery.ack())

    consume = RabbitSubscription._consume
    failures: list[int] = []

    async def fails_once(self: RabbitSubscription) -> None:
        if self._parked and not failures:  # the first try to consume again after the give-back
            failures.append(1)
            raise ConnectionError("the broker is away")
        await consume(self)

    monkeypatch.setattr(RabbitSubscription, "_consume", fails_once)
    async with Bus.from_url(rabbitmq_url) as sender, Bus.from_url(rabbitmq_url) as bus:
        await bus.subscribe(subjects.direct(agent), hangs_first, group=group,
                            options=ConsumerOptions(ack_wait=ACK_WAIT))
        await sender.send("pm", agent, "m")
        await eventually(lambda: attempts == [1], 20, "the first delivery")
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        await eventually(lambda: any(sub.given_back for sub in backend._subs), ACK_WAIT + BOUND, "the give-back")
        release.set()
        await eventually(lambda: attempts == [1, 2], ACK_WAIT + BOUND, "the same message again, attempt 2")
    assert given_back == [True] and failures == [1]
