"""The conformance suite every backend runs unchanged (Watermill's ``TestPubSub`` idea).

A backend's test module subclasses :class:`ConformanceSuite`, sets
``features`` and provides one fixture, ``bus_factory``: an async callable
returning a *started* :class:`~squadbus.core.bus.Bus` connected to the same
broker each time it is called (the suite closes what it opens)::

    class TestRedisConformance(ConformanceSuite):
        features = Features(name="redis", persistent=True)

        @pytest.fixture
        async def bus_factory(self, redis_url):
            async def make() -> Bus:
                return await Bus.from_url(redis_url).start()
            return make

Every test uses fresh agent ids, groups and executions, so a shared server
needs no cleaning between tests. Waits are bounded by ``features.timeout``;
no test asserts how fast anything happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, ReadsAll, StartFrom
from squadbus.core.batching import batched
from squadbus.core.bus import CORRELATION_ID, Bus
from squadbus.core.dispatch import DLQ_ATTEMPTS, DLQ_GROUP, DLQ_ORIGINAL_ID, DLQ_REASON
from squadbus.core.envelope import Message
from squadbus.core.errors import (
    ConfigError,
    InvalidMessage,
    InvalidSubject,
    MessageTooLarge,
    Nack,
    ReceiveTimeout,
    Reject,
    RequestTimeout,
)
from squadbus.core.inbox import Inbox
from squadbus.testing import inbox_host

BusFactory = Callable[[], Awaitable[Bus]]
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class Features:
    """What a backend promises beyond the common contract.

    ``persistent``: messages survive the broker restarting (tested by the
    backend's own fault tests; here it only documents). ``dedupe``: the
    backend drops a second publish of the same ``id``; without it, delivery is
    at-least-once and the store dedupes. ``replay``: the backend implements
    :class:`~squadbus.core.backend.Replayable`. ``splits_work``: members of
    one group each get part of the work under load. ``shared_attempts``: a
    message given back by a consumer that closed reaches the next consumer with
    its attempt count kept (Kafka counts attempts in memory per consumer, so
    there it starts again at 1). ``timeout``: seconds any wait may take before
    the test fails. ``scale``: a multiplier on message counts for slow backends
    (1.0 = the full suite).

    Inboxes at scale (issue 15, docs/design/inboxes.md): ``inbox_scale`` is how
    many default inboxes one Bus opens at once in the scale case (2,000 is the
    target; a backend that still pays a broker consumer or connection per inbox
    runs what it holds today). ``inbox_resource_bound`` is the broker-side bound
    per Bus (Redis connections ≤ 8, NATS consumers ≤ 8, Kafka members ≤ 4; None
    where there is no broker), counted by the suite's ``broker_resources``
    fixture. ``inboxes_multiplexed``: inboxes share the Bus's broker resources
    and tasks; until it is set, the cost case asserts today's cost *grows* with
    the agents, so it fails, and asks for the flag, the day it stops growing.
    ``host_placement``: how the host-process cases place agents, ``(url, agents,
    hosts) -> [(host url, its agents), ...]``; None places by ``crc32(agent) %
    hosts``, every host on ``url`` (Kafka places by partition, with the host's
    slot in its URL).
    """

    name: str
    persistent: bool = True
    dedupe: bool = True
    replay: bool = True
    splits_work: bool = True
    shared_attempts: bool = True
    timeout: float = 20.0
    scale: float = 1.0
    inbox_scale: int = 2000
    inbox_resource_bound: int | None = None
    inboxes_multiplexed: bool = False
    host_placement: Callable[[str, Sequence[str], int], list[tuple[str, list[str]]]] | None = None


def open_sockets() -> int:
    """Sockets this process holds open (Linux ``/proc/self/fd``): the default count of broker connections."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # closed between listdir and readlink
            continue
    return count


def _chunks(items: Sequence[_T], size: int) -> list[Sequence[_T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``check()`` is true; fail the test with ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class Collector:
    """A handler that records every delivery it acks."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        self.messages.append(delivery.message)

    @property
    def ids(self) -> list[uuid.UUID]:
        return [m.id for m in self.messages]


def _has_all(collector: Collector, ids: set[uuid.UUID]) -> Callable[[], bool]:
    return lambda: set(collector.ids) >= ids


def _at_least(collector: Collector, count: int) -> Callable[[], bool]:
    return lambda: len(collector.messages) >= count


class ConformanceSuite:
    """Behaviour every backend must show. Subclass it; see the module docstring."""

    features: Features

    @pytest.fixture
    async def open_bus(self, bus_factory: BusFactory) -> AsyncIterator[BusFactory]:
        """Open buses through ``bus_factory`` and close them all after the test."""
        opened: list[Bus] = []

        async def make() -> Bus:
            bus = await bus_factory()
            opened.append(bus)
            return bus

        yield make
        for bus in reversed(opened):
            await bus.close()

    @pytest.fixture
    async def bus(self, open_bus: BusFactory) -> Bus:
        """One started Bus."""
        return await open_bus()

    @pytest.fixture
    def broker_resources(self) -> Callable[[], Awaitable[int]]:
        """Counts the broker resources ``inbox_resource_bound`` is about; override per backend.

        The default counts this process's open sockets (connections to the broker).
        """
        async def count() -> int:
            return open_sockets()

        return count

    def n(self, count: int) -> int:
        """``count`` scaled by ``features.scale`` (at least 2)."""
        return max(2, int(count * self.features.scale))

    # ---- basics ------------------------------------------------------------------------------

    async def test_publish_subscribe_keeps_payload_and_metadata(self, bus: Bus) -> None:
        agent, execution = _uid("agent"), uuid.uuid4()
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=_uid("g"))
        metadata = {"priority": 2, "tags": ["a", "ü"], "nested": {"ok": True, "n": None}}
        sent = await bus.send(
            "pm", agent, "héllo ✓ " * 100, "question",
            task_execution_id=execution, metadata=metadata, headers={"traceparent": "00-abc-def-01"},
        )
        await eventually(lambda: len(got.messages) == 1, self.features.timeout, "one delivery")
        received = got.messages[0]
        assert received == sent
        assert received.metadata == metadata
        assert received.created_at == sent.created_at
        assert received.headers["traceparent"] == "00-abc-def-01"
        assert got.deliveries[0].attempt == 1

    async def test_topic_isolation(self, bus: Bus) -> None:
        a, b = _uid("a"), _uid("b")
        got_a, got_b = Collector(), Collector()
        await bus.subscribe(subjects.direct(a), got_a, group=_uid("g"))
        await bus.subscribe(subjects.direct(b), got_b, group=_uid("g"))
        for i in range(5):
            await bus.send("pm", a, f"for-a-{i}")
        await bus.send("pm", b, "for-b")
        await eventually(lambda: len(got_a.messages) == 5 and len(got_b.messages) == 1, self.features.timeout,
                         "5 messages for a and 1 for b")
        await asyncio.sleep(0.2)
        assert [m.content for m in got_b.messages] == ["for-b"]
        assert all(m.recipient_id == a for m in got_a.messages)

    async def test_wildcard_routing(self, bus: Bus) -> None:
        tag = uuid.uuid4().hex[:8]
        one_token, rest = Collector(), Collector()
        await bus.subscribe("agent.message.domain.*", one_token, group=_uid("g"), options=_new())
        await bus.subscribe("agent.message.>", rest, group=_uid("g"), options=_new())
        direct = await bus.send("pm", f"dev-{tag}", "direct")
        dom = await bus.broadcast("pm", "to dev domain", domain=f"dev{tag}")
        squad = await bus.broadcast("pm", "to all")
        await eventually(lambda: {direct.id, dom.id, squad.id} <= set(rest.ids), self.features.timeout,
                         "agent.message.> to see all three")
        await eventually(lambda: dom.id in one_token.ids, self.features.timeout, "domain.* to see the domain one")
        await asyncio.sleep(0.2)
        assert direct.id not in one_token.ids and squad.id not in one_token.ids

    async def test_invalid_input_is_refused_and_nothing_is_delivered(self, bus: Bus) -> None:
        agent = _uid("agent")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=_uid("g"))
        with pytest.raises(InvalidSubject):
            await bus.send("pm", "bad.agent", "x")
        with pytest.raises(InvalidSubject):
            await bus.subscribe("agent..x", got)
        with pytest.raises(MessageTooLarge):
            await bus.send("pm", agent, "x" * (bus.max_content_bytes + 1))
        with pytest.raises(ValueError, match="metadata"):
            await bus.send("pm", agent, "x", metadata=["not", "an", "object"])  # type: ignore[arg-type]
        outside = envelope.build(subject="billing.invoice", sender_id="pm", content="x")
        with pytest.raises(InvalidSubject, match="outside the squadbus scheme"):
            await bus.publish(outside)
        with pytest.raises(InvalidSubject, match="outside the squadbus scheme"):
            await bus.publish_many([outside, outside.evolve(id=uuid.uuid4())])
        # A lone surrogate has no UTF-8 form (no broker, store or client could carry it): refused at once,
        # and the sends beside it in the same loop turn (one pipeline or batch on some backends) go on.
        outcomes = await asyncio.gather(
            bus.send("pm", agent, "fine"), bus.send("pm", agent, "bad \ud800 text"),
            bus.send("pm", agent, "x", metadata={"note": "\udfff"}), bus.send("pm", agent, "fine too"),
            return_exceptions=True)
        assert [type(o) for o in outcomes[1:3]] == [InvalidMessage, InvalidMessage], outcomes
        assert "Unicode" in str(outcomes[1]) or "surrogate" in str(outcomes[1])
        ok = [o for o in (outcomes[0], outcomes[3]) if isinstance(o, Message)]
        assert len(ok) == 2, outcomes
        await eventually(lambda: len(got.messages) >= 2, self.features.timeout, "the valid messages")
        await asyncio.sleep(0.2)
        assert sorted(got.ids) == sorted(m.id for m in ok)

    # ---- concurrency -------------------------------------------------------------------------

    async def test_concurrent_publishers_and_subscribers(self, bus: Bus, open_bus: BusFactory) -> None:
        agent = _uid("agent")
        publishers, subscribers, per_publisher = 50, self.n(50), 4
        collectors = [Collector() for _ in range(subscribers)]
        for c in collectors:
            await bus.subscribe(subjects.direct(agent), c, group=_uid("g"))
        other = await open_bus()

        async def publish(p: int) -> list[uuid.UUID]:
            target = bus if p % 2 else other
            return [(await target.send(f"pub-{p}", agent, f"{p}-{i}")).id for i in range(per_publisher)]

        sent = {i for ids in await asyncio.gather(*(publish(p) for p in range(publishers))) for i in ids}
        assert len(sent) == publishers * per_publisher
        for c in collectors:
            await eventually(_has_all(c, sent), self.features.timeout * 2, "every subscriber to get all")

    async def test_many_subjects_concurrently(self, bus: Bus) -> None:
        agents = [_uid("agent") for _ in range(self.n(20))]
        collectors = {a: Collector() for a in agents}
        for a in agents:
            await bus.subscribe(subjects.direct(a), collectors[a], group=_uid("g"))

        async def publish(a: str) -> None:
            for i in range(10):
                await bus.send("pm", a, f"{a}-{i}")

        await asyncio.gather(*(publish(a) for a in agents))
        for a in agents:
            c = collectors[a]
            await eventually(_at_least(c, 10), self.features.timeout, f"10 messages for {a}")
            assert {m.recipient_id for m in c.messages} == {a}
            assert [m.content for m in c.messages] == [f"{a}-{i}" for i in range(10)]

    # ---- acknowledgement ---------------------------------------------------------------------

    async def test_redelivery_on_failure_counts_attempts(self, bus: Bus) -> None:
        agent = _uid("agent")
        attempts: list[int] = []

        async def flaky(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            if delivery.attempt < 3:
                raise RuntimeError("not yet")

        options = ConsumerOptions(max_deliver=5, backoff_base=0.01, backoff_max=0.05, ack_wait=5)
        await bus.subscribe(subjects.direct(agent), flaky, group=_uid("g"), options=options)
        await bus.send("pm", agent, "retry me")
        await eventually(lambda: attempts[-1:] == [3], self.features.timeout, "third attempt")
        await asyncio.sleep(0.3)
        assert attempts == [1, 2, 3]

    async def test_explicit_nack_redelivers(self, bus: Bus) -> None:
        agent = _uid("agent")
        seen: list[int] = []

        async def handler(delivery: Delivery) -> None:
            seen.append(delivery.attempt)
            if delivery.attempt == 1:
                assert await delivery.nack(0.01) is True
                assert await delivery.nack() is False  # first settle wins
                assert await delivery.ack() is False

        await bus.subscribe(subjects.direct(agent), handler, group=_uid("g"),
                            options=ConsumerOptions(ack_wait=5))
        await bus.send("pm", agent, "nack me once")
        await eventually(lambda: seen == [1, 2], self.features.timeout, "one redelivery")

    async def test_no_second_message_while_first_is_unsettled(self, bus: Bus) -> None:
        agent = _uid("agent")
        release = asyncio.Event()
        order: list[str] = []

        async def handler(delivery: Delivery) -> None:
            order.append(delivery.message.content)
            if delivery.message.content == "1":
                await release.wait()

        await bus.subscribe(subjects.direct(agent), handler, group=_uid("g"), options=ConsumerOptions(ack_wait=10))
        await bus.send("pm", agent, "1")
        await bus.send("pm", agent, "2")
        await eventually(lambda: order == ["1"], self.features.timeout, "the first message")
        await asyncio.sleep(0.3)
        assert order == ["1"]
        release.set()
        await eventually(lambda: order == ["1", "2"], self.features.timeout, "the second message after ack")

    async def test_max_in_flight_hands_over_several_at_once(self, bus: Bus) -> None:
        agent = _uid("agent")
        arrived: list[str] = []
        all_here = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            arrived.append(delivery.message.content)
            if len(arrived) >= 3:
                all_here.set()
            # With max_in_flight=1 this would wait forever: the test proves concurrency.
            await asyncio.wait_for(all_here.wait(), self.features.timeout)

        options = ConsumerOptions(max_in_flight=3, ack_wait=self.features.timeout * 2)
        await bus.subscribe(subjects.direct(agent), handler, group=_uid("g"), options=options)
        for i in range(3):
            await bus.send("pm", agent, str(i))
        await eventually(all_here.is_set, self.features.timeout, "three deliveries in flight together")
        assert sorted(arrived) == ["0", "1", "2"]

    async def test_batched_handler_acks_after_the_batch(self, bus: Bus) -> None:
        agent = _uid("agent")
        batches: list[list[str]] = []
        fail_first = [True]

        async def process(messages: Sequence[Message]) -> None:
            if fail_first[0]:
                fail_first[0] = False
                raise RuntimeError("database unavailable")
            batches.append([m.content for m in messages])

        total = self.n(40)
        options = ConsumerOptions(max_in_flight=total, backoff_base=0.01, backoff_max=0.05, ack_wait=10)
        await bus.subscribe(subjects.direct(agent), batched(process, max_batch=total, max_wait=0.05),
                            group=_uid("g"), options=options)
        for i in range(total):
            await bus.send("pm", agent, str(i))
        await eventually(lambda: sum(map(len, batches)) >= total, self.features.timeout, "every message written")
        written = [c for b in batches for c in b]
        assert sorted(written, key=int) == [str(i) for i in range(total)], "a failed batch must be redelivered"
        assert len(batches) < total, "messages should be written in batches"

    async def test_batch_subscription_settles_each_delivery_by_outcome(self, bus: Bus) -> None:
        agent, group = _uid("agent"), _uid("g")
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(group), dlq, group=_uid("dlq"))
        total = self.n(30)
        batches: list[list[tuple[str, int]]] = []
        done: set[str] = set()

        async def handle(deliveries: Sequence[Delivery]) -> dict[Delivery, BaseException]:
            batches.append([(d.message.content, d.attempt) for d in deliveries])
            failures: dict[Delivery, BaseException] = {}
            for d in deliveries:
                if d.message.content == "poison":
                    failures[d] = Reject("cannot be stored")
                elif d.message.content == "0" and d.attempt == 1:
                    failures[d] = Nack("try again")
                else:
                    done.add(d.message.content)
            return failures

        options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=self.features.timeout * 2)
        await bus.subscribe_batch(subjects.direct(agent), handle, group=group, max_batch=8, max_wait=0.05,
                                  options=options)
        poison = await bus.send("pm", agent, "poison")
        for i in range(total):
            await bus.send("pm", agent, str(i))
        await eventually(lambda: len(done) >= total, self.features.timeout * 2, "every good message handled")
        await eventually(lambda: len(dlq.messages) >= 1, self.features.timeout, "the rejected message dead-lettered")
        assert done == {str(i) for i in range(total)}
        assert all(len(batch) <= 8 for batch in batches)
        assert len(batches) < total + 1, "messages should arrive in batches"
        assert ("0", 2) in [item for batch in batches for item in batch], "the nacked one comes back, attempt 2"
        assert dlq.messages[0].headers[DLQ_ORIGINAL_ID] == str(poison.id)
        assert "cannot be stored" in dlq.messages[0].headers[DLQ_REASON]
        await asyncio.sleep(0.3)
        handled = Counter(content for batch in batches for content, _ in batch)
        assert handled["poison"] == 1 and all(handled[str(i)] == (2 if i == 0 else 1) for i in range(total))

    async def test_batch_fills_with_messages_arriving_within_max_wait(self, bus: Bus) -> None:
        # 60 messages are ready, 60 more arrive a moment later, well within max_wait: the first batch
        # is full (100), not the 60 that were ready with the rest held back until max_wait ran out.
        agent = _uid("agent")
        sizes: list[int] = []

        async def handle(deliveries: Sequence[Delivery]) -> None:
            sizes.append(len(deliveries))

        await bus.subscribe_batch(subjects.direct(agent), handle, group=_uid("g"), max_batch=100,
                                  max_wait=self.features.timeout * 2)
        subject = subjects.direct(agent)
        await bus.publish_many([envelope.build(subject=subject, sender_id="pm", recipient_id=agent, content=str(i))
                                for i in range(60)])
        await asyncio.sleep(0.3)
        await bus.publish_many([envelope.build(subject=subject, sender_id="pm", recipient_id=agent, content=str(i))
                                for i in range(60, 120)])
        await eventually(lambda: bool(sizes), self.features.timeout, "the first batch")
        assert sizes[0] == 100, f"the first batch should fill up to max_batch, got {sizes}"

    async def test_batch_subscription_redelivers_a_failed_batch(self, bus: Bus) -> None:
        agent = _uid("agent")
        written: list[str] = []
        fail_first = [True]

        async def handle(deliveries: Sequence[Delivery]) -> None:
            if fail_first[0]:
                fail_first[0] = False
                raise RuntimeError("database unavailable")
            written.extend(d.message.content for d in deliveries)

        total = self.n(40)
        options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=self.features.timeout * 2)
        await bus.subscribe_batch(subjects.direct(agent), handle, group=_uid("g"), max_batch=total, max_wait=0.05,
                                  options=options)
        for i in range(total):
            await bus.send("pm", agent, str(i))
        await eventually(lambda: len(set(written)) >= total, self.features.timeout, "every message written")
        assert sorted(set(written), key=int) == [str(i) for i in range(total)], "a failed batch is redelivered"

    async def test_dead_letter_after_max_deliver_with_reason(self, bus: Bus) -> None:
        agent, group = _uid("agent"), _uid("g")
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(group), dlq, group=_uid("dlq"))
        attempts: list[int] = []

        async def always_fails(delivery: Delivery) -> None:
            attempts.append(delivery.attempt)
            raise ValueError("cannot parse the task")

        options = ConsumerOptions(max_deliver=3, backoff_base=0.01, backoff_max=0.02, ack_wait=5)
        await bus.subscribe(subjects.direct(agent), always_fails, group=group, options=options)
        sent = await bus.send("pm", agent, "poison")
        await eventually(lambda: len(dlq.messages) == 1, self.features.timeout, "one dead letter")
        dead = dlq.messages[0]
        assert dead.headers[DLQ_ORIGINAL_ID] == str(sent.id)
        assert dead.headers[DLQ_GROUP] == group
        assert dead.headers[DLQ_ATTEMPTS] == "3"
        assert "cannot parse the task" in dead.headers[DLQ_REASON]
        assert dead.content == "poison"
        await asyncio.sleep(0.3)
        assert attempts == [1, 2, 3]

    # ---- groups ------------------------------------------------------------------------------

    async def test_each_group_gets_everything_members_split(self, bus: Bus, open_bus: BusFactory) -> None:
        agent = _uid("agent")
        other = await open_bus()
        analytics, member_a, member_b = Collector(), Collector(), Collector()
        workers = _uid("workers")

        def slow(c: Collector) -> Callable[[Delivery], Awaitable[None]]:
            async def handler(delivery: Delivery) -> None:
                await c(delivery)
                await asyncio.sleep(0.005)
            return handler

        await bus.subscribe(subjects.direct(agent), analytics, group=_uid("analytics"))
        await bus.subscribe(subjects.direct(agent), slow(member_a), group=workers)
        await other.subscribe(subjects.direct(agent), slow(member_b), group=workers)
        total = self.n(200)
        sent = [
            (await bus.send("pm", agent, f"job-{i}", task_execution_id=uuid.uuid4())).id for i in range(total)
        ]
        await eventually(lambda: len(set(analytics.ids)) == total, self.features.timeout, "analytics to get all")
        await eventually(lambda: len(set(member_a.ids) | set(member_b.ids)) == total, self.features.timeout * 2,
                         "the workers group to get all")
        await asyncio.sleep(0.3)
        counts = Counter(member_a.ids + member_b.ids)
        assert set(counts) == set(sent)
        assert max(counts.values()) == 1, "a message acked by one member went to another"
        if self.features.splits_work:
            assert member_a.messages and member_b.messages, "both members should get work"

    async def test_buses_creating_one_group_at_once_get_each_earlier_message_once(
        self, bus: Bus, open_bus: BusFactory
    ) -> None:
        # Several processes starting the same consumer (the db-writer on every host, say) create its group
        # at the same moment: what was sent before is delivered once, not once per creator (RabbitMQ copied
        # the log's backlog into the new queue once per process that found it missing).
        agent, group = _uid("agent"), _uid("g")
        sent = [(await bus.send("pm", agent, f"before-{i}")).id for i in range(10)]
        members = [bus, await open_bus(), await open_bus()]
        got = Collector()
        options = ConsumerOptions(start=StartFrom.EARLIEST)
        await asyncio.gather(*(m.subscribe(subjects.direct(agent), got, group=group, options=options)
                               for m in members))
        await eventually(lambda: set(sent) <= set(got.ids), self.features.timeout * 2, "every earlier message")
        await asyncio.sleep(0.5)  # time for a second copy to arrive, if one were made
        counts = Counter(got.ids)
        assert set(counts) == set(sent)
        assert max(counts.values()) == 1, "an earlier message delivered more than once"

    async def test_group_resumes_after_close(self, bus: Bus, open_bus: BusFactory) -> None:
        agent, group = _uid("agent"), _uid("g")
        first = Collector()
        sub = await bus.subscribe(subjects.direct(agent), first, group=group)
        before = [(await bus.send("pm", agent, f"a{i}")).id for i in range(5)]
        await eventually(lambda: len(first.messages) == 5, self.features.timeout, "first five")
        await bus.unsubscribe(sub)
        after = [(await bus.send("pm", agent, f"b{i}")).id for i in range(5)]
        second = Collector()
        other = await open_bus()
        await other.subscribe(subjects.direct(agent), second, group=group)
        await eventually(lambda: len(second.messages) >= 5, self.features.timeout, "the five sent while closed")
        await asyncio.sleep(0.3)
        assert first.ids == before
        assert second.ids == after

    async def test_close_while_consuming_loses_nothing(self, bus: Bus, open_bus: BusFactory) -> None:
        agent, group = _uid("agent"), _uid("g")
        done: list[uuid.UUID] = []

        async def slow(delivery: Delivery) -> None:
            await asyncio.sleep(0.01)
            done.append(delivery.message.id)

        consumer = await open_bus()
        await consumer.subscribe(subjects.direct(agent), slow, group=group, options=ConsumerOptions(ack_wait=3))
        total = self.n(60)
        sent = [(await bus.send("pm", agent, f"m{i}")).id for i in range(total)]
        await eventually(lambda: len(done) >= 5, self.features.timeout, "some progress")
        await consumer.close()
        replacement = await open_bus()
        await replacement.subscribe(subjects.direct(agent), slow, group=group, options=ConsumerOptions(ack_wait=3))
        await eventually(lambda: set(done) >= set(sent), self.features.timeout * 2, "every message processed")

    async def test_order_per_execution(self, bus: Bus) -> None:
        agent, group = _uid("agent"), _uid("g")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=group)
        executions = [uuid.uuid4() for _ in range(16)]
        per_execution = self.n(20)

        async def run(execution: uuid.UUID) -> None:
            for i in range(per_execution):
                await bus.send("pm", agent, str(i), task_execution_id=execution)

        await asyncio.gather(*(run(e) for e in executions))
        total = len(executions) * per_execution
        await eventually(lambda: len(got.messages) >= total, self.features.timeout * 2, "every message")
        by_execution: dict[uuid.UUID | None, list[int]] = defaultdict(list)
        for m in got.messages:
            by_execution[m.task_execution_id].append(int(m.content))
        for execution in executions:
            assert by_execution[execution] == list(range(per_execution)), f"order broken for {execution}"

    async def test_publish_many_stores_all_in_order_per_execution(self, bus: Bus) -> None:
        agent, group = _uid("agent"), _uid("g")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=group)
        executions = [uuid.uuid4() for _ in range(4)]
        per_execution = self.n(50)
        batch = [
            envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content=str(i),
                           task_execution_id=execution)
            for i in range(per_execution) for execution in executions
        ]
        stored = await bus.publish_many(batch)
        assert [m.id for m in stored] == [m.id for m in batch]
        await eventually(lambda: len(got.messages) >= len(batch), self.features.timeout * 2, "the whole batch")
        assert sorted(got.ids) == sorted(m.id for m in batch)
        for execution in executions:
            order = [int(m.content) for m in got.messages if m.task_execution_id == execution]
            assert order == list(range(per_execution)), f"order broken for {execution}"

    async def test_publish_many_with_one_bad_message_publishes_nothing(self, bus: Bus) -> None:
        agent = _uid("agent")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=_uid("g"))
        good = envelope.build(subject=subjects.direct(agent), sender_id="pm", content="good")
        too_big = msgspec.structs.replace(good, id=uuid.uuid4(), content="x" * (bus.max_content_bytes + 1))
        with pytest.raises(MessageTooLarge):
            await bus.publish_many([good, too_big])
        marker = await bus.send("pm", agent, "after")
        await eventually(lambda: len(got.messages) >= 1, self.features.timeout, "the marker")
        await asyncio.sleep(0.2)
        assert got.ids == [marker.id]

    # ---- inbox, request/reply, dedupe, replay ------------------------------------------------

    async def test_inbox_holds_direct_messages_sent_before_it_opens(self, bus: Bus) -> None:
        agent = _uid("agent")
        early = await bus.send("pm", agent, "sent before the inbox opened", "task")
        async with bus.inbox(agent) as inbox:
            first = await inbox.get(self.features.timeout)
            assert first.message.id == early.id
            await first.ack()
            squad = await bus.broadcast("pm", "stand-up in 5")
            second = await inbox.get(self.features.timeout)
            assert second.message.id == squad.id
            assert second.attempt == 1

    async def test_inbox_nack_redelivers_to_the_same_agent(self, bus: Bus) -> None:
        agent = _uid("agent")
        async with bus.inbox(agent, broadcasts=False) as inbox:
            sent = await bus.send("pm", agent, "do it twice")
            first = await inbox.get(self.features.timeout)
            await first.nack(0.01)
            again = await inbox.get(self.features.timeout)
            assert again.message.id == sent.id
            assert again.attempt == 2

    async def test_inbox_redelivers_a_delivery_whose_handling_raised(self, bus: Bus) -> None:
        # The common loop without ``async with delivery``: its body raises, the agent iterates again.
        agent = _uid("agent")
        options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=self.features.timeout * 2)
        attempts: list[int] = []

        async def work_through(inbox: Inbox) -> None:
            async for delivery in inbox:
                attempts.append(delivery.attempt)
                raise RuntimeError("the model timed out")

        async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
            sent = await bus.send("pm", agent, "fails once")
            with pytest.raises(RuntimeError, match="the model timed out"):
                await work_through(inbox)
            again = await inbox.get(self.features.timeout)
            assert again.message.id == sent.id, "the failed delivery must come back, not be acked"
            assert again.attempt == 2
            assert attempts == [1]
            await again.ack()

    async def test_inbox_async_with_delivery_acks_retries_and_dead_letters(self, bus: Bus) -> None:
        agent = _uid("agent")
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(f"inbox-{agent}"), dlq, group=_uid("dlq"))
        options = ConsumerOptions(max_deliver=3, backoff_base=0.01, backoff_max=0.05,
                                  ack_wait=self.features.timeout * 2)
        handled: list[tuple[str, int]] = []

        async def work_through(inbox: Inbox) -> None:
            async for delivery in inbox:
                async with delivery:
                    handled.append((delivery.message.content, delivery.attempt))
                    if delivery.message.content == "flaky" and delivery.attempt == 1:
                        raise RuntimeError("try again")
                    if delivery.message.content == "poison":
                        raise ValueError("cannot do this one")

        async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
            worker = asyncio.create_task(work_through(inbox))
            poison = await bus.send("pm", agent, "poison")
            for content in ("ok", "flaky"):
                await bus.send("pm", agent, content)
            await eventually(lambda: len(dlq.messages) == 1 and ("flaky", 2) in handled, self.features.timeout,
                             "the flaky message retried and the poison one dead-lettered")
            await asyncio.sleep(0.3)
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        assert sorted(handled) == [("flaky", 1), ("flaky", 2), ("ok", 1), ("poison", 1), ("poison", 2), ("poison", 3)]
        dead = dlq.messages[0]
        assert dead.headers[DLQ_ORIGINAL_ID] == str(poison.id)
        assert dead.headers[DLQ_ATTEMPTS] == "3"
        assert "cannot do this one" in dead.headers[DLQ_REASON]

    async def test_leaving_the_bus_after_an_agent_raised_holding_a_delivery(self, open_bus: BusFactory) -> None:
        agent = _uid("agent")
        bus = await open_bus()
        sent = await bus.send("pm", agent, "held when the agent fails")

        async def agent_run() -> None:
            async with bus:
                inbox = await bus.inbox(agent, broadcasts=False).open()
                held = await inbox.get(self.features.timeout)
                assert held.message.id == sent.id
                raise RuntimeError("the agent crashed")

        run = asyncio.create_task(agent_run())
        done, _ = await asyncio.wait({run}, timeout=self.features.timeout * 2)
        if not done:
            run.cancel()
            pytest.fail("leaving 'async with Bus' hung on the delivery the agent held")
        error = run.exception()
        assert isinstance(error, RuntimeError) and str(error) == "the agent crashed", error
        async with (await open_bus()).inbox(agent, broadcasts=False) as inbox:
            again = await inbox.get(self.features.timeout)
            assert again.message.id == sent.id, "the held delivery was nacked, not lost"
            assert again.attempt == (2 if self.features.shared_attempts else 1)
            await again.ack()

    # ---- inboxes with a handler instead of a loop --------------------------------------------------

    async def test_inbox_function_handler_gets_direct_and_broadcasts_and_retries_failures(self, bus: Bus) -> None:
        agent, domain = _uid("agent"), _uid("dom")
        options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=self.features.timeout * 2)
        handled: list[tuple[str, int]] = []

        def on_message(delivery: Delivery) -> None:  # a plain function: called inline, no task of its own
            handled.append((delivery.message.content, delivery.attempt))
            if delivery.message.content.startswith("flaky") and delivery.attempt == 1:
                raise RuntimeError("try again")

        await bus.send("pm", agent, "sent before it opened")
        async with bus.inbox(agent, domains=[domain], options=options, handler=on_message):
            for content in ("ok", "flaky direct"):
                await bus.send("pm", agent, content)
            await bus.broadcast("pm", "flaky squad")
            await bus.broadcast("pm", "dev sync", domain=domain)
            expected = [("sent before it opened", 1), ("ok", 1), ("flaky direct", 1), ("flaky direct", 2),
                        ("flaky squad", 1), ("flaky squad", 2), ("dev sync", 1)]
            await eventually(lambda: sorted(handled) == sorted(expected), self.features.timeout * 2,
                             f"every message once, the two failures again (got {handled})")
            direct = [content for content, _ in handled if content in ("sent before it opened", "ok")]
            assert direct == ["sent before it opened", "ok"], "an agent's direct messages come in order"
            await asyncio.sleep(0.3)
        assert sorted(handled) == sorted(expected), "an acked delivery is not redelivered"

    async def test_inbox_async_handler_takes_one_at_a_time_and_close_lets_it_finish(self, bus: Bus) -> None:
        agent = _uid("agent")
        running = 0
        most = 0
        handled: list[str] = []
        started = asyncio.Event()

        async def on_message(delivery: Delivery) -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            if delivery.message.content == "slow":
                started.set()
            await asyncio.sleep(0.2 if delivery.message.content == "slow" else 0.01)
            handled.append(delivery.message.content)
            running -= 1

        inbox = await bus.inbox(agent, broadcasts=False, handler=on_message).open()
        for content in ("one", "two", "three"):
            await bus.send("pm", agent, content)
        await eventually(lambda: len(handled) == 3, self.features.timeout, "three messages handled")
        assert handled == ["one", "two", "three"] and most == 1, "in order, one at a time"
        with pytest.raises(ConfigError, match="has a handler"):
            await inbox.get(0.1)
        await bus.send("pm", agent, "slow")
        await asyncio.wait_for(started.wait(), self.features.timeout)
        await inbox.close()  # waits for the delivery in hand: it is acked, not given back
        assert handled[-1] == "slow"
        async with bus.inbox(agent, broadcasts=False) as again:
            with pytest.raises(ReceiveTimeout):
                await again.get(0.5)

    # ---- broadcasts to inboxes: read once per Bus, copied to each open inbox -------------------

    async def test_inbox_broadcasts_are_read_once_per_bus_and_reach_every_inbox(self, bus: Bus) -> None:
        domain = _uid("dom")
        agents = [_uid("agent") for _ in range(12)]
        inboxes = [await bus.inbox(agent, domains=[domain]).open() for agent in agents]
        try:
            # One per broadcast subject (2), or one for all where literal subscriptions are not cheap.
            assert 1 <= bus.broadcast_hub.subscriptions <= 2, "broadcasts read once per Bus, not per inbox"
            squad = await bus.broadcast("pm", "all hands")
            dom = await bus.broadcast("pm", "dev sync", domain=domain)

            async def two(inbox: Inbox) -> set[uuid.UUID]:
                got = set()
                for _ in range(2):
                    delivery = await inbox.get(self.features.timeout)
                    got.add(delivery.message.id)
                    assert delivery.attempt == 1
                    await delivery.ack()
                return got

            results = await asyncio.gather(*(two(inbox) for inbox in inboxes))
            assert all(r == {squad.id, dom.id} for r in results)
        finally:
            await asyncio.gather(*(inbox.close() for inbox in inboxes))
        assert bus.broadcast_hub.subscriptions == 0, "the last inbox out closes the broadcast subscriptions"

    async def test_inbox_broadcast_nack_comes_back_to_that_agent_only(self, bus: Bus) -> None:
        options = ConsumerOptions(backoff_base=0.01, backoff_max=0.05, ack_wait=self.features.timeout * 2)
        slow, fine = _uid("slow"), _uid("fine")
        async with bus.inbox(slow, options=options) as first, bus.inbox(fine, options=options) as second:
            sent = await bus.broadcast("pm", "stand-up")
            got = await first.get(self.features.timeout)
            await got.nack(0.01)
            once = await second.get(self.features.timeout)
            assert once.message.id == sent.id
            await once.ack()
            again = await first.get(self.features.timeout)
            assert (again.message.id, again.attempt) == (sent.id, 2)
            await again.ack()
            with pytest.raises(ReceiveTimeout):
                await second.get(0.3)

    async def test_inbox_broadcast_copy_dead_letters_after_max_deliver(self, bus: Bus) -> None:
        agent = _uid("agent")
        dlq = Collector()
        await bus.subscribe(subjects.dead_letter(f"inbox-{agent}"), dlq, group=_uid("dlq"))
        options = ConsumerOptions(max_deliver=2, backoff_base=0.01, backoff_max=0.02,
                                  ack_wait=self.features.timeout * 2)
        async with bus.inbox(agent, options=options) as inbox:
            sent = await bus.broadcast("pm", "poison for this agent")
            for attempt in (1, 2):
                delivery = await inbox.get(self.features.timeout)
                assert (delivery.message.id, delivery.attempt) == (sent.id, attempt)
                await delivery.fail(ValueError("cannot"))
            await eventually(lambda: len(dlq.messages) == 1, self.features.timeout, "the dead letter")
        dead = dlq.messages[0]
        assert dead.headers[DLQ_ORIGINAL_ID] == str(sent.id)
        assert dead.headers[DLQ_GROUP] == f"inbox-{agent}"

    async def test_a_closed_inbox_gives_its_broadcast_copy_back_and_others_go_on(self, bus: Bus) -> None:
        leaving, staying = _uid("leaving"), _uid("staying")
        async with bus.inbox(staying) as stays:
            async with bus.inbox(leaving) as leaves:
                first = await bus.broadcast("pm", "one")
                held = await leaves.get(self.features.timeout)
                assert held.message.id == first.id
            # Closed holding its copy: the copy is given back, not acked, and not redelivered elsewhere.
            assert held.settled == "nack"
            for expected in (first, await bus.broadcast("pm", "two")):
                delivery = await stays.get(self.features.timeout)
                assert delivery.message.id == expected.id
                await delivery.ack()

    # ---- inboxes at scale (issue 15) ------------------------------------------------------------

    async def test_scale_many_inboxes_each_get_their_own_message_once(self, bus: Bus) -> None:
        agents = [_uid("agent") for _ in range(self.features.inbox_scale)]
        inboxes = [bus.inbox(agent) for agent in agents]
        try:
            for chunk in _chunks(inboxes, 200):
                await asyncio.gather(*(inbox.open() for inbox in chunk))
            sent: dict[str, uuid.UUID] = {}
            for names in _chunks(agents, 200):
                messages = await asyncio.gather(*(bus.send("pm", agent, f"for {agent}") for agent in names))
                sent.update((m.recipient_id or "", m.id) for m in messages)

            async def first(inbox: Inbox) -> uuid.UUID:
                delivery = await inbox.get(self.features.timeout)
                await delivery.ack()
                return delivery.message.id

            got = await asyncio.gather(*(first(inbox) for inbox in inboxes))
            assert dict(zip(agents, got, strict=True)) == sent, "every inbox gets the message sent to its agent"

            async def nothing_more(inbox: Inbox) -> uuid.UUID | None:
                try:
                    extra = await inbox.get(0.5)
                except ReceiveTimeout:
                    return None
                await extra.ack()
                return extra.message.id

            extras = [i for i in await asyncio.gather(*(nothing_more(inbox) for inbox in inboxes)) if i]
            assert extras == [], f"{len(extras)} messages delivered twice"
        finally:
            for chunk in _chunks(inboxes, 200):
                await asyncio.gather(*(inbox.close() for inbox in chunk))

    async def test_scale_inbox_cost_stays_bounded_per_bus(
        self, bus: Bus, broker_resources: Callable[[], Awaitable[int]]
    ) -> None:
        # More agents than any bound: 20 default inboxes (direct + squad + one domain each).
        count = 20
        bound = self.features.inbox_resource_bound
        await asyncio.sleep(0.2)  # let connections of earlier tests finish closing
        resources_before = await broker_resources()
        # A first inbox pays what a Bus pays once (the broadcast subscriptions, a backend's inbox
        # tasks): the tasks counted are those the next ``count`` agents add; the broker resources
        # counted are all of them, the first inbox's included.
        first = await bus.inbox(_uid("agent"), domains=["dev"]).open()
        inboxes = [bus.inbox(_uid("agent"), domains=["dev"]) for _ in range(count)]
        try:
            tasks_before = len(asyncio.all_tasks())
            await asyncio.gather(*(inbox.open() for inbox in inboxes))
            resources = await broker_resources() - resources_before
            tasks = len(asyncio.all_tasks()) - tasks_before
        finally:
            await asyncio.gather(*(inbox.close() for inbox in [first, *inboxes]))
        if self.features.inboxes_multiplexed:
            assert tasks <= 4, f"{count} inboxes started {tasks} tasks"
            if bound is not None:
                assert resources <= bound, f"{count} inboxes hold {resources} broker resources (bound {bound})"
        else:
            # Today's cost, which issue 15 removes: a consumer (tasks, and on a broker a
            # connection or consumer) per subscription. Set inboxes_multiplexed once this fails.
            assert tasks >= count, f"{count} inboxes started only {tasks} tasks: set Features.inboxes_multiplexed"
            if bound is not None:
                assert resources > bound, (
                    f"{count} inboxes hold {resources} broker resources, within the bound {bound}: "
                    "set Features.inboxes_multiplexed")

    async def test_nack_delay_zero_is_at_once_none_is_the_backoff(self, bus: Bus) -> None:
        # A backoff longer than any wait here: only a redelivery "at once" can arrive in time.
        options = ConsumerOptions(backoff_base=60, backoff_max=60, ack_wait=120)
        seen: dict[str, list[int]] = {"now": [], "later": []}

        def nacking(content: str, delay: float | None) -> Callable[[Delivery], Awaitable[None]]:
            async def handler(delivery: Delivery) -> None:
                seen[content].append(delivery.attempt)
                if delivery.attempt == 1:
                    raise Nack("again", delay=delay)
            return handler

        now, later = _uid("now"), _uid("later")
        await bus.subscribe(subjects.direct(now), nacking("now", 0), group=_uid("g"), options=options)
        await bus.subscribe(subjects.direct(later), nacking("later", None), group=_uid("g"), options=options)
        await bus.send("pm", later, "later")
        await bus.send("pm", now, "now")
        await eventually(lambda: seen["now"] == [1, 2], self.features.timeout, "Nack(delay=0) to redeliver at once")
        await eventually(lambda: seen["later"] == [1], self.features.timeout, "the first delivery of 'later'")
        await asyncio.sleep(0.3)
        assert seen["later"] == [1], "Nack() waits for the backoff policy"

    async def test_request_reply_and_timeout(self, bus: Bus, open_bus: BusFactory) -> None:
        responder_bus = await open_bus()
        agent = _uid("agent")

        async def answer(delivery: Delivery) -> None:
            await responder_bus.reply(delivery.message, agent, delivery.message.content.upper())

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"))
        reply = await bus.request("pm", agent, "status?", timeout=self.features.timeout)
        assert reply.content == "STATUS?"
        assert reply.sender_id == agent
        silent = _uid("silent")
        with pytest.raises(RequestTimeout):
            await bus.request("pm", silent, "anyone?", timeout=0.5)

    async def test_a_reply_is_in_the_log_like_every_message(self, bus: Bus, open_bus: BusFactory) -> None:
        """A reply reaches the groups reading ``agent.reply.>`` (the db-writer, the SSE and analytics
        workers) once, even where the backend answers requests outside its log."""
        responder_bus = await open_bus()
        agent, execution = _uid("agent"), uuid.uuid4()
        logged = Collector()
        await bus.subscribe(f"{subjects.REPLY_PREFIX}.>", logged, group=_uid("history"))

        reply_id = uuid.uuid4()

        async def answer(delivery: Delivery) -> None:
            # answered twice with one id, as a handler run again after a redelivery would
            for _ in range(2):
                await responder_bus.reply(delivery.message, agent, "done", id=reply_id)

        await responder_bus.subscribe(subjects.direct(agent), answer, group=_uid("g"))
        reply = await bus.request("pm", agent, "do it", timeout=self.features.timeout, task_execution_id=execution)
        assert reply.id == reply_id
        await eventually(lambda: reply.id in logged.ids, self.features.timeout, "the reply in the log")
        stored = next(m for m in logged.messages if m.id == reply.id)
        assert stored.subject.startswith(f"{subjects.REPLY_PREFIX}.")
        assert (stored.sender_id, stored.recipient_id, stored.content) == (agent, "pm", "done")
        assert stored.headers[CORRELATION_ID] == reply.headers[CORRELATION_ID]
        assert stored.task_execution_id == execution
        await asyncio.sleep(0.2)
        copies = logged.ids.count(reply.id)
        if self.features.dedupe:
            assert copies == 1, "a reply sent again with its id is stored once"
        else:
            assert copies in (1, 2), "at-least-once: the store dedupes by id"

    async def test_duplicate_id_is_delivered_once_or_marked(self, bus: Bus) -> None:
        agent = _uid("agent")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=_uid("g"))
        message_id = uuid.uuid4()
        await bus.send("pm", agent, "once", id=message_id)
        await bus.send("pm", agent, "once", id=message_id)
        marker = await bus.send("pm", agent, "after")
        await eventually(lambda: marker.id in got.ids, self.features.timeout, "the marker message")
        copies = got.ids.count(message_id)
        if self.features.dedupe:
            assert copies == 1
        else:
            assert copies in (1, 2), "at-least-once: the store dedupes by id"

    async def test_replay_of_an_execution(self, bus: Bus) -> None:
        execution, agent = uuid.uuid4(), _uid("agent")
        other_execution = uuid.uuid4()
        sent = [await bus.send("pm", agent, f"step {i}", task_execution_id=execution) for i in range(5)]
        await bus.send("pm", agent, "other", task_execution_id=other_execution)
        if not self.features.replay:
            with pytest.raises(ConfigError):
                async for _ in bus.replay(execution):
                    pass
            return
        replayed = [item async for item in bus.replay(execution)]
        assert [m.id for _, m in replayed] == [m.id for m in sent]
        positions = [p for p, _ in replayed]
        assert positions == sorted(positions)
        tail = [m.id async for _, m in bus.replay(execution, from_seq=positions[2])]
        assert tail == [m.id for m in sent[2:]]
        since = [m.id async for _, m in bus.replay(execution, since=sent[3].created_at)]
        assert since == [m.id for m in sent[3:]]

    async def test_new_group_start_new_skips_old_messages(self, bus: Bus) -> None:
        agent = _uid("agent")
        await bus.send("pm", agent, "old")
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=_uid("g"), options=_new())
        fresh = await bus.send("pm", agent, "new")
        await eventually(lambda: fresh.id in got.ids, self.features.timeout, "the new message")
        assert [m.content for m in got.messages] == ["new"]

    async def test_read_all_reads_what_is_retained_up_to_where_it_began(self, bus: Bus) -> None:
        backend = bus.backend
        assert isinstance(backend, ReadsAll)
        agent, other = _uid("agent"), _uid("agent")
        executions = [uuid.uuid4(), uuid.uuid4(), None]
        start = envelope.utcnow() - timedelta(seconds=10)
        sent = [envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content=f"m{i}",
                               task_execution_id=executions[i % 3], created_at=start + timedelta(milliseconds=i))
                for i in range(self.n(90))]
        await bus.publish_many(sent)
        await bus.send("pm", other, "another subject")
        got: list[Message] = []
        late: list[Message] = []
        async with contextlib.aclosing(backend.read_all(subjects.direct(agent))) as reading:
            async for message in reading:
                if not late:
                    late.append(await bus.send("pm", agent, "published after the read began"))
                got.append(message)
        assert sorted(m.id for m in got) == sorted(m.id for m in sent)
        for execution in executions[:2]:
            assert [m.id for m in got if m.task_execution_id == execution] == \
                [m.id for m in sent if m.task_execution_id == execution]
        cut = len(sent) // 2
        since = [m.id async for m in backend.read_all(subjects.direct(agent), since=sent[cut].created_at)]
        assert sorted(since) == sorted(m.id for m in sent[cut:] + late)


def _new() -> ConsumerOptions:
    return ConsumerOptions(start=StartFrom.NEW)



class HostProcessCases:
    """Inboxes across host processes, for backends whose broker outlives a process (issue 15, item 2).

    Mix into a backend's conformance class next to :class:`ConformanceSuite`
    and provide a ``bus_url`` fixture: the URL child processes connect to.
    Hosts run :mod:`squadbus.testing.inbox_host`; agents are placed by
    ``crc32(agent) % hosts``, as ``squadbus simulate`` places them.
    """

    features: Features
    host_agents = 10
    """Agents per host process."""
    host_ack_wait = 2.0
    """The hosts' ack wait: how long a dead host's deliveries stay with it."""

    @pytest.fixture
    async def start_host(self, bus_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[_Host]]]:
        """Start host processes; each is killed (SIGKILL, by PID) at the end of the test if still running."""
        hosts: list[_Host] = []

        async def start(agents: Sequence[str], mode: str = "ack", url: str | None = None) -> _Host:
            log = tmp_path / f"host-{len(hosts)}.log"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", inbox_host.MODULE, url or bus_url, str(log), str(self.host_ack_wait), mode,
                *agents)
            host = _Host(proc, log)
            hosts.append(host)
            await eventually(lambda: host.ready or proc.returncode is not None, self.features.timeout * 3,
                             f"host {log.name} to open {len(agents)} inboxes")
            assert proc.returncode is None, f"host {log.name} exited with {proc.returncode}"
            return host

        yield start
        for host in hosts:
            await host.kill()

    async def test_hosts_get_only_their_own_agents_messages(
        self, bus: Bus, bus_url: str, start_host: Callable[..., Awaitable[_Host]]
    ) -> None:
        agents = [_uid("agent") for _ in range(2 * self.host_agents)]
        if self.features.host_placement is not None:
            urls, placed = zip(*self.features.host_placement(bus_url, agents, 2), strict=True)
        else:
            urls, placed = (bus_url, bus_url), ([], [])
            for agent in agents:
                placed[zlib.crc32(agent.encode()) % 2].append(agent)
        hosts = [await start_host(placed[0], url=urls[0]), await start_host(placed[1], url=urls[1])]
        sent = {m.id: m.recipient_id for m in await asyncio.gather(*(bus.send("pm", a, "hi") for a in agents))}
        await eventually(lambda: sum(len(h.deliveries()) for h in hosts) >= len(sent), self.features.timeout * 3,
                         "every message delivered to a host")
        await asyncio.sleep(0.5)  # time for a copy to reach the other host, if one were sent
        for index, host in enumerate(hosts):
            got = host.deliveries()
            assert len(got) == len({message_id for _, message_id, _ in got}), "a host got a message twice"
            assert {agent for agent, _, _ in got} == set(placed[index]), "a host got another host's agent"
            assert {sent[message_id] for _, message_id, _ in got} == set(placed[index])
        assert sorted(str(i) for h in hosts for _, i, _ in h.deliveries()) == sorted(str(i) for i in sent)

    async def test_kill9_of_a_host_loses_nothing_when_its_agents_open_elsewhere(
        self, bus: Bus, start_host: Callable[..., Awaitable[_Host]]
    ) -> None:
        agents = [_uid("agent") for _ in range(self.host_agents)]
        host = await start_host(agents, mode="hold")
        first = {m.recipient_id: m.id for m in await asyncio.gather(*(bus.send("pm", a, "1") for a in agents))}
        second = {m.recipient_id: m.id for m in await asyncio.gather(*(bus.send("pm", a, "2") for a in agents))}
        await eventually(lambda: len(host.deliveries()) >= len(agents), self.features.timeout * 3,
                         "the host to hold a delivery per agent")
        await host.kill()
        options = ConsumerOptions(ack_wait=self.host_ack_wait)

        async def reopen(agent: str) -> list[tuple[uuid.UUID, int]]:
            async with bus.inbox(agent, broadcasts=False, options=options) as inbox:
                got = []
                for _ in range(2):
                    delivery = await inbox.get(self.features.timeout * 2)
                    got.append((delivery.message.id, delivery.attempt))
                    await delivery.ack()
                return got

        results = dict(zip(agents, await asyncio.gather(*(reopen(a) for a in agents)), strict=True))
        for agent, got in results.items():
            assert [message_id for message_id, _ in got] == [first[agent], second[agent]], (
                f"{agent}: the message the dead host held, then the next, in order")
            if self.features.shared_attempts:
                assert got[0][1] >= 2, f"{agent}: the held message comes back as a redelivery"


class _Host:
    """A running :mod:`squadbus.testing.inbox_host` process and its log."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log

    def _lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    @property
    def ready(self) -> bool:
        return "ready" in self._lines()

    def deliveries(self) -> list[tuple[str, uuid.UUID, int]]:
        """``(agent, message id, attempt)`` per delivery the host logged."""
        rows = [line.split() for line in self._lines() if line != "ready"]
        return [(agent, uuid.UUID(message_id), int(attempt)) for agent, message_id, attempt in rows]

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
