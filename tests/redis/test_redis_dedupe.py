"""The publish side on a real Redis: dedupe (ids remembered per time bucket, within and across calls),
and publish_many split over several Lua calls and writes, in order."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from squadbus.backends.redis import RedisBackend, RedisSettings
from squadbus.core import envelope, subjects

pytestmark = pytest.mark.redis


def _message(agent: str, text: str, id: uuid.UUID | None = None) -> envelope.Message:
    return envelope.build(subject=subjects.direct(agent), sender_id="pm", recipient_id=agent, content=text, id=id)


@contextlib.asynccontextmanager
async def _backend(url: str) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend(RedisSettings.from_url(url))
    await backend.connect()
    try:
        yield backend
    finally:
        await backend.close()


async def _stored(backend: RedisBackend, agent: str) -> list[str]:
    client = backend._client
    assert client is not None
    entries = await client.xrange(backend.layout.subject_stream(subjects.direct(agent)))
    return [envelope.decode(fields[b"m"]).content for _, fields in entries]


async def test_duplicate_ids_within_and_across_calls_are_stored_once(redis_url: str) -> None:
    async with _backend(redis_url) as backend:
        first, second = _message("dev-1", "a"), _message("dev-1", "b")
        again = _message("dev-1", "a-again", id=first.id)
        # one call holding a duplicate, then a call repeating an id of the first
        await backend.publish_many([first, second, again])
        assert await backend._require()[1].publish(_message("dev-1", "b-again", id=second.id)) is False
        assert await _stored(backend, "dev-1") == ["a", "b"]
        stats = backend.stats()
        assert (stats["published"], stats["duplicates_dropped"]) == (2, 2)


async def test_ids_are_forgotten_after_two_windows_and_kept_for_one(redis_url: str) -> None:
    async with _backend(f"{redis_url}&dedupe_window=1") as backend:
        message = _message("dev-2", "once")
        await backend.publish(message)
        await backend.publish(message)  # same bucket or the next: a duplicate
        assert await _stored(backend, "dev-2") == ["once"]
        await asyncio.sleep(2.2)  # past the current and the previous bucket: remembered no longer
        await backend.publish(message)
        assert await _stored(backend, "dev-2") == ["once", "once"]
        client = backend._client
        assert client is not None
        buckets = [key async for key in client.scan_iter(match=f"{backend.settings.prefix}:ids:*")]
        assert 1 <= len(buckets) <= 2, f"old buckets are unlinked, not left to pile up: {buckets}"


async def test_dedupe_window_zero_stores_every_publish(redis_url: str) -> None:
    async with _backend(f"{redis_url}&dedupe_window=0") as backend:
        message = _message("dev-3", "twice")
        await backend.publish_many([message, message])
        assert await _stored(backend, "dev-3") == ["twice", "twice"]


async def test_publish_many_over_several_lua_calls_and_writes_keeps_order_and_dedupes(redis_url: str) -> None:
    # publish_batch=4: 70 messages are 18 Lua calls, written in runs of 8 calls (32 messages).
    async with _backend(f"{redis_url}&publish_batch=4") as backend:
        messages = [_message("dev-4", f"m{i}") for i in range(70)]
        # duplicates of earlier ids: in the next Lua call of the same write, and in a later write
        messages[5] = _message("dev-4", "dup-of-m2", id=messages[2].id)
        messages[40] = _message("dev-4", "dup-of-m30", id=messages[30].id)
        await backend.publish_many(messages)
        expected = [m.content for i, m in enumerate(messages) if i not in (5, 40)]
        assert await _stored(backend, "dev-4") == expected
        stats = backend.stats()
        assert (stats["published"], stats["duplicates_dropped"]) == (68, 2)
