"""RabbitMQ-specific delivery behaviour: the backlog a new group copies from the log, the per-process
dedupe window, a literal '#' token (an AMQP wildcard) in an agent id, and a message never settled."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.backends.rabbitmq import RabbitBackend
from squadbus.backends.rabbitmq.subscriber import UNSETTLED_MARGIN
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_ATTEMPTS, DLQ_ORIGINAL_ID, DLQ_REASON
from squadbus.core.errors import BackendTimeout
from squadbus.testing.conformance import Collector, eventually

pytestmark = pytest.mark.rabbitmq


async def test_a_new_group_gets_the_backlog_once_in_order_and_a_later_member_copies_nothing(
    rabbitmq_url: str,
) -> None:
    agent, other, group = f"a-{uuid.uuid4().hex[:8]}", f"o-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus, Bus.from_url(rabbitmq_url) as second:
        early = [(await bus.send("pm", agent, f"early-{i}")).id for i in range(20)]
        await bus.send("pm", other, "not for this group")
        first = Collector()
        await bus.subscribe(subjects.direct(agent), first, group=group)
        await eventually(lambda: len(first.messages) >= 20, 20, "the backlog")
        late = Collector()
        await second.subscribe(subjects.direct(agent), late, group=group)  # joins: no second copy
        after = (await bus.send("pm", agent, "after")).id
        await eventually(lambda: after in first.ids + late.ids, 20, "the message sent after both joined")
        await asyncio.sleep(0.3)
        assert first.ids[:20] == early, "the backlog arrives once, in publish order"
        assert sorted(map(str, first.ids + late.ids)) == sorted(map(str, [*early, after]))


async def test_the_same_id_published_twice_by_one_process_is_stored_once(rabbitmq_url: str) -> None:
    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus:
        got = Collector()
        await bus.subscribe(subjects.direct(agent), got, group=f"g-{uuid.uuid4().hex[:8]}")
        message_id = uuid.uuid4()
        for _ in range(3):
            await bus.send("pm", agent, "once", id=message_id)
        marker = await bus.send("pm", agent, "marker")
        await eventually(lambda: marker.id in got.ids, 20, "the marker")
        assert got.ids == [message_id, marker.id]


async def test_an_agent_id_that_is_an_amqp_wildcard_gets_only_its_own_messages(rabbitmq_url: str) -> None:
    async with Bus.from_url(rabbitmq_url) as bus:
        hash_inbox, plain = Collector(), Collector()
        await bus.subscribe(subjects.direct("#"), hash_inbox, group="hash")
        await bus.subscribe(subjects.direct("plain"), plain, group="plain")
        to_plain = await bus.send("pm", "plain", "for plain")
        to_hash = await bus.send("pm", "#", "for #")
        await eventually(lambda: to_hash.id in hash_inbox.ids and to_plain.id in plain.ids, 20, "both messages")
        await asyncio.sleep(0.3)
        assert hash_inbox.ids == [to_hash.id] and plain.ids == [to_plain.id]


async def test_a_message_never_settled_is_dead_lettered_after_max_deliver_and_the_margin(rabbitmq_url: str) -> None:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    options = ConsumerOptions(max_deliver=2)
    attempts: list[int] = []

    async def hangs(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        await asyncio.Event().wait()  # a consumer that never settles it (hung, or crashing each time)

    async with Bus.from_url(rabbitmq_url) as watcher:
        dlq = Collector()
        await watcher.subscribe(subjects.dead_letter(group), dlq, group=f"dlq-{group}")
        sent = await watcher.send("pm", agent, "never settled")
        for attempt in range(1, 2 + UNSETTLED_MARGIN + 1):
            # Closing the Bus cancels the hung handler: the message goes back, its delivery count + 1.
            async with Bus.from_url(rabbitmq_url, close_timeout=0.2) as consumer:
                await consumer.subscribe(subjects.direct(agent), hangs, group=group, options=options)
                await eventually(lambda a=attempt: len(attempts) >= a, 20, f"delivery {attempt}")
        async with Bus.from_url(rabbitmq_url, close_timeout=0.2) as consumer:
            await consumer.subscribe(subjects.direct(agent), hangs, group=group, options=options)
            await eventually(lambda: len(dlq.messages) == 1, 20, "the dead letter")
        assert attempts == [1, 2, 3, 4], "the handler is not called once the margin is used up"
        dead = dlq.messages[0]
        assert dead.headers[DLQ_ORIGINAL_ID] == str(sent.id)
        assert dead.headers[DLQ_ATTEMPTS] == "5"
        assert "without being settled" in dead.headers[DLQ_REASON]


async def test_a_group_whose_backlog_copy_failed_gets_the_backlog_on_the_next_subscribe(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, group = f"a-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus:
        early = await bus.send("pm", agent, "sent before the group existed")
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        copy = backend.copy_backlog

        async def fails(queue: str, pattern: str, accept: object = None) -> int:
            raise BackendTimeout("the log stopped answering")

        monkeypatch.setattr(backend, "copy_backlog", fails)
        got = Collector()
        with pytest.raises(BackendTimeout):
            await bus.subscribe(subjects.direct(agent), got, group=group)
        monkeypatch.setattr(backend, "copy_backlog", copy)
        await bus.subscribe(subjects.direct(agent), got, group=group)
        await eventually(lambda: early.id in got.ids, 20, "the backlog after the retry")


async def test_groups_created_at_once_share_reads_of_the_log_and_each_gets_its_backlog(rabbitmq_url: str) -> None:
    agents = [f"a{i}-{uuid.uuid4().hex[:6]}" for i in range(20)]
    async with Bus.from_url(rabbitmq_url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        early = {agent: (await bus.send("pm", agent, "before")).id for agent in agents}
        inboxes = {agent: Collector() for agent in agents}
        await asyncio.gather(*(bus.subscribe(subjects.direct(a), inboxes[a], group=f"inbox-{a}") for a in agents))
        await eventually(lambda: all(early[a] in inboxes[a].ids for a in agents), 20, "every backlog")
        await asyncio.sleep(0.3)
        assert all(inboxes[a].ids == [early[a]] for a in agents)
        assert backend._backlog.passes < len(agents)


async def test_a_subscription_past_the_channel_max_is_refused_and_the_others_keep_working(
    rabbitmq_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 inboxes on one Bus reached RabbitMQ's channel_max (2047) and the broker closed the whole
    # connection; here the connection is told a small channel_max so the limit comes after 3.
    from squadbus.backends.rabbitmq.backend import CHANNEL_RESERVE
    from squadbus.core.errors import BackendError

    agent = f"a-{uuid.uuid4().hex[:8]}"
    async with Bus.from_url(rabbitmq_url) as bus:
        backend = bus.backend
        assert isinstance(backend, RabbitBackend)
        tune = backend.connection.transport.connection.connection_tune  # type: ignore[union-attr]
        monkeypatch.setattr(tune, "channel_max", CHANNEL_RESERVE + 3)
        got = [Collector() for _ in range(3)]
        for i, collector in enumerate(got):
            await bus.subscribe(subjects.direct(agent), collector, group=f"g{i}")
        with pytest.raises(BackendError, match="channel_max is"):
            await bus.subscribe(subjects.direct(agent), Collector(), group="g3")
        sent = await bus.send("pm", agent, "still connected")
        await eventually(lambda: all(sent.id in c.ids for c in got), 20, "the message in every group")
