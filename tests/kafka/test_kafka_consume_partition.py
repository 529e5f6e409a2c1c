"""A partition's bookkeeping (PartitionState.add/settle): what is queued, what is settled at once, where the
commit floor goes. Pure bookkeeping, no broker: the records are built as aiokafka hands them out."""

from __future__ import annotations

from aiokafka.structs import ConsumerRecord

from squadbus.backends.kafka._driver import TopicPartition
from squadbus.backends.kafka.partition import PartitionState
from squadbus.backends.kafka.producer import ID_HEADER, SUBJECT_HEADER

PATTERN = "agent.message.dev-1"


def record(offset: int, subject: str | None = PATTERN, *, subject_first: bool = True) -> ConsumerRecord:
    headers: list[tuple[str, bytes]] = [(ID_HEADER, b"0" * 16)]
    if subject is not None:
        named = (SUBJECT_HEADER, subject.encode())
        headers = [named, *headers] if subject_first else [*headers, named]
    return ConsumerRecord("t", 0, offset, 0, 0, None, b"v", None, 1, 1, headers)


def offsets(part: PartitionState) -> list[int]:
    return [r.offset for r in part.queue]


def test_matching_records_are_queued_the_others_settled_wherever_the_subject_header_is() -> None:
    part, matched = PartitionState(TopicPartition("t", 0)), dict[bytes, bool]()
    queued = part.add([record(0), record(1, "agent.message.other"), record(2, subject_first=False),
                       record(3, "agent.message.other", subject_first=False), record(4, None)], PATTERN, matched)
    assert queued == 3
    assert offsets(part) == [0, 2, 4]  # a record without a subject header (not squadbus's) is delivered
    assert list(part.outstanding) == [0, 1, 2, 3, 4] and part.settled == {1, 3}
    assert part.floor is None
    assert part.settle(0) and part.floor == 2  # past the settled non-matching record
    assert not part.settle(4) and part.floor == 2
    assert part.settle(2) and part.floor == 5 and not part.outstanding and not part.settled
    assert part.to_commit() == 5


def test_non_matching_records_with_nothing_outstanding_move_the_floor() -> None:
    part, matched = PartitionState(TopicPartition("t", 0)), dict[bytes, bool]()
    assert part.add([record(7, "agent.message.x"), record(8, "agent.message.y")], PATTERN, matched) == 0
    assert part.floor == 9 and not part.outstanding and not part.queue
    assert part.add([record(9), record(10, "agent.message.x")], PATTERN, matched) == 1
    assert list(part.outstanding) == [9, 10] and part.settled == {10}


def test_records_fetched_again_after_a_seek_are_skipped() -> None:
    part, matched = PartitionState(TopicPartition("t", 0)), dict[bytes, bool]()
    part.add([record(o) for o in range(3)], PATTERN, matched)
    assert part.add([record(o) for o in range(1, 5)], PATTERN, matched) == 2  # 1 and 2 are held
    assert offsets(part) == [0, 1, 2, 3, 4]
    for offset in range(5):
        part.queue.popleft()
        part.settle(offset)
    assert part.floor == 5 and not part.outstanding
    assert part.add([record(o) for o in range(3, 7)], PATTERN, matched) == 2  # 3 and 4 are done
    assert offsets(part) == [5, 6]
