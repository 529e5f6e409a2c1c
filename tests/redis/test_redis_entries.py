"""Reading a stream entry's subject and payload without a dict per entry (no server needed)."""

from __future__ import annotations

import pytest

from squadbus.backends.redis._driver import entry_parts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([b"m", b"P"], (None, b"P")),  # a subject stream entry
        ([b"s", b"agent.message.a", b"m", b"P"], (b"agent.message.a", b"P")),  # one written before 2026-12-01
        ([b"s", b"agent.message.a", b"x", b"E", b"m", b"P"], (b"agent.message.a", b"P")),  # a partition entry
        ([b"junk", b"no m field"], (None, None)),
        ([b"m", b"first", b"s", b"S", b"m", b"last"], (b"S", b"last")),  # repeated: the last wins, as in a dict
        ([b"x", b"E", b"s", b"S", b"m", b"P"], (b"S", b"P")),  # another order
        ([b"s", b"S", b"m"], (b"S", None)),  # odd length: the dangling name has no value
        ({b"s": b"S", b"m": b"P"}, (b"S", b"P")),  # as redis-py's callbacks give it
        ({b"other": b"1"}, (None, None)),
    ],
)
def test_entry_parts_reads_subject_and_payload(raw: list[bytes] | dict[bytes, bytes], expected: tuple) -> None:
    assert entry_parts(raw) == expected
    if isinstance(raw, list) and len(raw) % 2 == 0:
        fields = dict(zip(raw[::2], raw[1::2], strict=True))
        assert entry_parts(raw) == (fields.get(b"s"), fields.get(b"m"))  # the same as the dict would say
