"""The bridge on a Redis source after the previous bridge process died (issue 17 item 1)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from squadbus.backends.memory import MemoryBackend
from squadbus.backends.redis import RedisBackend
from squadbus.core import subjects
from squadbus.core.backend import StartFrom, durable_name
from squadbus.core.bus import Bus
from squadbus.workers.bridge import Bridge

pytestmark = pytest.mark.redis

WAIT = 30.0


async def test_a_restarted_bridge_takes_over_what_the_dead_one_held_before_new_messages(redis_url: str) -> None:
    """The dead bridge had read 40 messages and acked none; 20 more arrive after. A new bridge must
    copy the 40 first (they waited for ack_wait, 30 s, and then landed after the later ones), so the
    destination holds the execution in publish order."""
    group = f"bridge-{uuid.uuid4().hex[:8]}"
    execution = uuid.uuid4()
    pattern = subjects.ALL
    destination = Bus(MemoryBackend())
    async with Bus.from_url(redis_url) as source, destination:
        backend = source.backend
        assert isinstance(backend, RedisBackend)
        first = Bridge(source, destination, pattern=pattern, group=group, start_from=StartFrom.NEW)
        await first.start()  # creates the group at the end of the streams
        await first.stop()
        held = [await source.send("pm", "dev-1", f"held-{i}", task_execution_id=execution) for i in range(40)]
        raw = aioredis.from_url(redis_url.split("?", maxsplit=1)[0])
        try:  # the dead bridge's reads: in its pending list, never acked
            streams = dict.fromkeys(backend.layout.streams_for(pattern), ">")
            reply = await raw.xreadgroup(durable_name(group, pattern), "dead-bridge", streams, count=1000)
            assert sum(len(entries) for _, entries in reply) == len(held)
        finally:
            await raw.aclose()
        later = [await source.send("pm", "dev-1", f"later-{i}", task_execution_id=execution) for i in range(20)]
        second = Bridge(source, destination, pattern=pattern, group=group, start_from=StartFrom.NEW)
        await second.start()
        try:
            got: list[str] = []
            for _ in range(int(WAIT * 20)):
                got = [m.content async for _, m in destination.replay(execution)]
                if len(got) >= len(held) + len(later):
                    break
                await asyncio.sleep(0.05)
            assert got == [m.content for m in held + later], got[:5]
        finally:
            await second.stop()
