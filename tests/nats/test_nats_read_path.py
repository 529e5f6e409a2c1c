"""The NATS batch read path: data messages of a pull inbox taken raw (raw.py), acks as one write."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from squadbus.backends.nats.raw import InboxClient, RawMsg
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, durable_name
from squadbus.core.bus import Bus
from squadbus.core.dispatch import DLQ_GROUP, DLQ_ORIGINAL_ID
from squadbus.core.envelope import Message
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.nats

ACK_SUBJECT = "$JS.ACK.agent-messages.db-writer.1.42.42.1764872345123456789.0"


class Batches:
    """Collects the deliveries of a batch handler (it acks them all by returning None)."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []

    async def __call__(self, batch: Sequence[Delivery]) -> None:
        self.deliveries.extend(batch)

    @property
    def ids(self) -> list[uuid.UUID]:
        return [d.message.id for d in self.deliveries]


async def test_a_routed_inbox_gets_data_messages_raw_and_statuses_through_nats_py() -> None:
    client = InboxClient()
    raw: list[RawMsg] = []
    client._raw_routes[7] = raw.append
    headers = b"NATS/1.0\r\nNats-Msg-Id: abc\r\nOther:x y \r\n\r\n"
    await client._process_msg(7, b"_INBOX.x", ACK_SUBJECT.encode(), b"payload", headers)
    await client._process_msg(7, b"_INBOX.x", ACK_SUBJECT.encode(), b"no headers", b"")
    # A status (idle heartbeat) takes nats-py's path: no subscription 7 there, so it is dropped.
    await client._process_msg(7, b"_INBOX.x", b"", b"", b"NATS/1.0 100 Idle Heartbeat\r\n\r\n")
    await client._process_msg(8, b"_INBOX.y", ACK_SUBJECT.encode(), b"not routed", headers)
    assert [(m.subject, m.reply, m.data) for m in raw] == [
        ("_INBOX.x", ACK_SUBJECT, b"payload"), ("_INBOX.x", ACK_SUBJECT, b"no headers")]
    assert raw[0].headers == {"Nats-Msg-Id": "abc", "Other": "x y"}
    assert raw[1].headers is None


async def test_batch_deliveries_come_raw_in_order_and_are_all_acked(nats_url: str) -> None:
    group, execution = f"g-{uuid.uuid4().hex[:8]}", uuid.uuid4()
    subject = subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")
    async with Bus.from_url(nats_url) as bus:
        sent = [envelope.build(subject=subject, sender_id="pm", content=f"m{i}", task_execution_id=execution)
                for i in range(300)]
        await bus.publish_many(sent)
        got = Batches()
        await bus.subscribe_batch(subject, got, group=group, max_batch=100, max_wait=0.05,
                                  options=ConsumerOptions(ack_wait=30))
        await eventually(lambda: len(got.deliveries) >= len(sent), 20, "every message")
        assert got.ids == [m.id for m in sent]
        assert all(isinstance(d._msg, RawMsg) for d in got.deliveries)  # type: ignore[attr-defined]
        assert {d.attempt for d in got.deliveries} == {1}
        js = bus.backend.js  # type: ignore[attr-defined]
        stream = bus.backend.settings.stream  # type: ignore[attr-defined]
        name = durable_name(group, subject)

        async def settled() -> bool:
            info = await js.consumer_info(stream, name)
            return info.num_ack_pending == 0 and info.num_pending == 0 and info.num_redelivered == 0

        for _ in range(100):
            if await settled():
                break
            await asyncio.sleep(0.05)
        info = await js.consumer_info(stream, name)
        assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)
        assert info.ack_floor.stream_seq == info.delivered.stream_seq


async def test_a_member_of_an_ordered_group_keeps_nats_py_messages(nats_url: str) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    subject = subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")
    async with Bus.from_url(f"{nats_url}?ordered_groups=true") as bus:
        got = Batches()
        await bus.subscribe_batch(subject, got, group=group, max_batch=10, max_wait=0.05)
        sent = envelope.build(subject=subject, sender_id="pm", content="pinned")
        await bus.publish(sent)
        await eventually(lambda: got.ids == [sent.id], 20, "the message")
        assert isinstance(got.deliveries[0]._msg, Msg)  # type: ignore[attr-defined]  # it reads Nats-Pin-Id


async def test_malformed_bytes_on_the_raw_path_are_dead_lettered_with_their_msg_id(nats_url: str) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    subject = subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")
    async with Bus.from_url(nats_url) as bus:
        dead: list[Message] = []

        async def on_dead(batch: Sequence[Delivery]) -> None:
            dead.extend(d.message for d in batch)

        await bus.subscribe_batch(subjects.dead_letter(group), on_dead, group=f"dlq-{group}")
        got = Batches()
        await bus.subscribe_batch(subject, got, group=group, max_batch=10, max_wait=0.05)
        first = envelope.build(subject=subject, sender_id="pm", content="before")
        await bus.publish(first)
        nc = Client()
        await nc.connect(nats_url)
        try:
            await nc.jetstream().publish(subject, b"\x00\xffnot json", headers={"Nats-Msg-Id": "garbage-raw"})
        finally:
            await nc.close()
        last = envelope.build(subject=subject, sender_id="pm", content="after")
        await bus.publish(last)
        await eventually(lambda: last.id in got.ids and len(dead) == 1, 20, "both messages and one dead letter")
        assert got.ids == [first.id, last.id]
        assert dead[0].headers[DLQ_ORIGINAL_ID] == "garbage-raw"
        assert dead[0].headers[DLQ_GROUP] == group
