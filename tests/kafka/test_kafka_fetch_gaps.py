"""A fetch that skips an offset loses nothing: the partition is read again from the missing offset.

Seen on tansu 0.6 in scenario 5 (4 runs of 18 at ``fetch_max_wait_ms=25``): the db-writer group's fetch of
``agent-messages[0]`` returned offset 912 right after 910; 911 was in the topic at the end of the run but
never delivered, so the store missed one row. A broker that makes a later record visible before an
earlier one (or answers with the later batch first, which aiokafka's fetcher then skips past) does that.
On Apache Kafka the offsets of our topics have no gaps (no compaction, no transaction markers), so a gap is
read again for up to ``GAP_PATIENCE`` seconds before it is taken as a real one.

The integration tests make the driver's fetch drop one record once, as tansu's did, on a real broker.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from squadbus.backends.kafka import partition
from squadbus.backends.kafka._driver import AIOKafkaConsumer, TopicPartition
from squadbus.backends.kafka.partition import GapGuard
from squadbus.core import envelope, subjects
from squadbus.core.backend import ConsumerOptions, Delivery, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import ReceiveTimeout
from squadbus.testing.servers.kafka import TansuServer

TIMEOUT = 30.0
COUNT = 10
DROPPED = 3  # the offset the fetch skips once (the 4th record of a one-partition squad)


class _Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset


def _records(*offsets: int) -> list[Any]:
    return [_Record(offset) for offset in offsets]


def _offsets(records: list[Any]) -> list[int]:
    return [r.offset for r in records]


def test_contiguous_records_and_re_reads_are_all_taken() -> None:
    guard = GapGuard(TopicPartition("t", 0))
    taken, missing = guard.take(_records(5, 6, 7), 5, 0.0)
    assert (_offsets(taken), missing) == ([5, 6, 7], None)
    taken, missing = guard.take(_records(3, 4, 5, 6), 5, 0.0)  # 3, 4: re-read after a seek
    assert (_offsets(taken), missing) == ([3, 4, 5, 6], None)


def test_records_after_a_missing_offset_are_left_to_read_again() -> None:
    guard = GapGuard(TopicPartition("t", 0))
    taken, missing = guard.take(_records(5, 6, 8, 9), 5, 0.0)
    assert (_offsets(taken), missing) == ([5, 6], 7)
    taken, missing = guard.take(_records(8, 9), 7, 0.0)  # the fetch from 7 started after it
    assert (_offsets(taken), missing) == ([], 7)
    taken, missing = guard.take(_records(7, 8, 9), 7, 0.1)  # it is there now
    assert (_offsets(taken), missing) == ([7, 8, 9], None)


def test_a_gap_that_stays_is_taken_as_one_after_the_patience(caplog: pytest.LogCaptureFixture) -> None:
    guard = GapGuard(TopicPartition("t", 2))
    assert guard.take(_records(9, 10), 7, 100.0)[1] == 7
    assert guard.take(_records(9, 10), 7, 100.0 + partition.GAP_PATIENCE / 2)[1] == 7
    with caplog.at_level(logging.WARNING, logger="squadbus.backends.kafka"):
        taken, missing = guard.take(_records(9, 10), 7, 100.0 + partition.GAP_PATIENCE)
    assert (_offsets(taken), missing) == ([9, 10], None)
    assert any("offsets 7-8 of t[2]" in r.getMessage() for r in caplog.records)
    # A later gap is read again as the first one was.
    assert guard.take(_records(12), 11, 200.0)[1] == 11


def _url(tansu: TansuServer, tag: str) -> str:
    return f"{tansu.url}?partitions=1&idempotence=off&topic=t-{tag}&inbox_group=ib-{tag}"


@pytest.mark.kafka
async def test_a_group_gets_every_record_when_a_fetch_skips_one(
    tansu: TansuServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = _drop_in(monkeypatch, suffix="")
    tag = uuid.uuid4().hex[:10]
    execution = uuid.uuid4()
    async with Bus.from_url(_url(tansu, tag)) as bus:
        sent = [await bus.send("pm", "dev-1", f"m{i}", task_execution_id=execution) for i in range(COUNT)]
        got: list[envelope.Message] = []
        done = asyncio.Event()

        async def handler(delivery: Delivery) -> None:
            got.append(delivery.message)
            if len(got) >= COUNT:
                done.set()

        await bus.subscribe(subjects.direct("dev-1"), handler, group="writer",
                            options=ConsumerOptions(start=StartFrom.EARLIEST))
        await asyncio.wait_for(done.wait(), TIMEOUT)
        await asyncio.sleep(0.3)  # nothing more comes
    assert dropped == [TopicPartition(f"t-{tag}", 0)]
    assert [m.id for m in got] == [m.id for m in sent]


@pytest.mark.kafka
async def test_an_inbox_gets_every_record_when_a_fetch_skips_one(
    tansu: TansuServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped = _drop_in(monkeypatch, suffix=".inbox")
    tag = uuid.uuid4().hex[:10]
    async with Bus.from_url(_url(tansu, tag)) as bus:
        sent = [await bus.send("pm", "dev-1", f"m{i}") for i in range(COUNT)]
        got = []
        async with bus.inbox("dev-1", broadcasts=False) as inbox:
            for _ in range(COUNT):
                delivery = await inbox.get(TIMEOUT)
                got.append(delivery.message.id)
                await delivery.ack()
            with pytest.raises(ReceiveTimeout):
                await inbox.get(0.3)
    assert dropped == [TopicPartition(f"t-{tag}.inbox", 0)]
    assert got == [m.id for m in sent]


def _drop_in(monkeypatch: pytest.MonkeyPatch, *, suffix: str) -> list[TopicPartition]:
    """Make the driver's fetch drop offset DROPPED once in the first topic ending with ``suffix`` whose
    answer also holds a later record (as tansu's did; aiokafka's position then moves past it). Returns the
    list the dropped partition is put in."""
    original = AIOKafkaConsumer.getmany
    dropped: list[TopicPartition] = []

    async def getmany(self: AIOKafkaConsumer, *partitions: TopicPartition, **kwargs: Any) -> Any:
        batch = await original(self, *partitions, **kwargs)
        if not dropped:
            for tp, records in batch.items():
                if (tp.topic.endswith(suffix) and "." not in tp.topic.removesuffix(suffix)
                        and records[0].offset <= DROPPED < records[-1].offset):
                    batch[tp] = [r for r in records if r.offset != DROPPED]
                    dropped.append(tp)
        return batch

    monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
    return dropped


@pytest.mark.kafka
@pytest.mark.parametrize("reader", ["read_all", "replay"])
async def test_history_reads_get_every_record_when_a_fetch_skips_one(
    tansu: TansuServer, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    execution = uuid.uuid4()
    async with Bus.from_url(f"{_url(tansu, tag)}&inboxes=false") as bus:
        sent = [await bus.send("pm", "dev-1", f"m{i}", task_execution_id=execution) for i in range(COUNT)]
        dropped = _drop_in(monkeypatch, suffix="")
        if reader == "read_all":
            got = [m.id async for m in bus.backend.read_all(subjects.direct("dev-1"))]  # type: ignore[attr-defined]
        else:
            got = [m.id async for _, m in bus.replay(execution)]
    assert dropped == [TopicPartition(f"t-{tag}", 0)]
    assert got == [m.id for m in sent]
