"""The publish side on a real Redis: dedupe (ids remembered per time bucket, within and across calls),
publish_many split over several Lua calls and runs, in order, and the calls of a run written one by one
(a server without the script, a failure between two writes)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest

from squadbus.backends.redis import RedisBackend, RedisSettings, publisher
from squadbus.core import envelope, subjects
from squadbus.core.errors import PublishFailed

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
    # publish_batch=4: 70 messages are 18 Lua calls, in runs of 8 calls (32 messages), each call
    # written as soon as it is packed.
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


async def test_a_server_without_the_script_gets_its_source_and_stores_every_call_once(redis_url: str) -> None:
    async with _backend(f"{redis_url}&publish_batch=3") as backend:
        await backend.publish(_message("dev-5", "m0"))
        client = backend._client
        assert client is not None
        await client.script_flush()  # as a restarted server: every EVALSHA of the next run fails
        messages = [_message("dev-5", f"m{i}") for i in range(1, 11)]  # four Lua calls
        await backend.publish_many(messages)
        assert await _stored(backend, "dev-5") == [f"m{i}" for i in range(11)]
        assert backend.stats()["published"] == 11


async def test_a_failure_between_two_calls_fails_the_publish_and_leaves_no_reply_unread(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _backend(f"{redis_url}&publish_batch=2") as backend:
        messages = [_message("dev-6", f"m{i}") for i in range(5)]
        encode = envelope.encode

        def encode_failing_on_m3(message: envelope.Message) -> bytes:
            if message.content == "m3":
                raise RuntimeError("bug while packing")
            return encode(message)

        # The first call (m0, m1) is written before m3 is packed: its reply is never read, so the
        # connection must be dropped, not handed to the next command out of step.
        monkeypatch.setattr(publisher, "encode", encode_failing_on_m3)
        with pytest.raises(PublishFailed, match="bug while packing"):
            await backend.publish_many(messages)
        monkeypatch.setattr(publisher, "encode", encode)
        await backend.publish_many(messages)  # again, as the contract says: ids dedupe
        assert await backend._require()[1].publish(_message("dev-6", "after")) is True
        assert await _stored(backend, "dev-6") == ["m0", "m1", "m2", "m3", "m4", "after"]
