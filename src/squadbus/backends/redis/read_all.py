"""Everything retained, once (``ReadsAll``): ``XRANGE`` in pages over every partition stream.

Each partition stream's last entry id is noted first (``XREVRANGE ... COUNT 1``, the snapshot),
then the stream is read from its start (or from ``since`` less a clock slack, as an entry id) up to
that id. An entry whose subject field does not match the pattern is skipped without decoding.
Nothing is created on the server. Every call is bounded: the client has no socket timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from datetime import datetime, timedelta

from squadbus.backends.redis._driver import FAILURES, aioredis, call, translate
from squadbus.backends.redis.layout import KeyLayout
from squadbus.core import subjects
from squadbus.core.backend import read_back
from squadbus.core.envelope import Message

_PAGE = 1000
_CALL_TIMEOUT = 15.0  # seconds one Redis call may take
_CLOCK_SLACK = timedelta(seconds=60)  # entry ids come from Redis' clock, created_at from the sender's


async def read_all(
    client: aioredis.Redis, layout: KeyLayout, pattern: str, *, since: datetime | None = None,
    on_unreadable: Callable[[bytes], None] | None = None,
) -> AsyncGenerator[Message, None]:
    """Yield every message of the partition streams matching ``pattern``; see the module docstring."""
    ends: dict[str, str] = {}
    for stream in layout.partition_streams():
        last = await _call(client, f"read the end of {stream}", "XREVRANGE", stream, "+", "-", "COUNT", 1)
        if last:
            ends[stream] = last[0][0].decode()
    floor = "-" if since is None else f"{max(0, int((since - _CLOCK_SLACK).timestamp() * 1000))}-0"
    for stream, end in ends.items():
        start = floor
        while True:
            page = await _call(client, f"read {stream}", "XRANGE", stream, start, end, "COUNT", _PAGE)
            for _, fields in page:
                subject = fields.get(b"s", b"").decode()
                if subject and not subjects.matches(pattern, subject):
                    continue
                message = read_back(fields.get(b"m", b""), pattern, since, on_unreadable)
                if message is not None:
                    yield message
            if len(page) < _PAGE:
                break
            start = "(" + page[-1][0].decode()


async def _call(client: aioredis.Redis, what: str, *args: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    try:
        async with asyncio.timeout(_CALL_TIMEOUT):
            result: list[tuple[bytes, dict[bytes, bytes]]] = await call(client, *args)
            return result
    except FAILURES as exc:
        raise translate(exc, what) from exc
