"""The README's example (examples/squad.py) on a real Redis that holds backlog from earlier runs."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.core.bus import Bus
from tests.core.test_readme import EXPECTED, run_example

pytestmark = pytest.mark.redis


async def test_example_prints_its_own_reply_over_old_backlog(redis_url: str) -> None:
    assert set(await asyncio.to_thread(run_example, redis_url)) == EXPECTED
    async with Bus.from_url(redis_url) as bus:
        # What an earlier run can leave behind: a status nobody took and a task nobody finished.
        await bus.send("dev-1", "pm", "done (left over)", "status", task_execution_id=uuid.uuid4())
        await bus.send("pm", "dev-1", "an old task", "task", task_execution_id=uuid.uuid4())
    lines = await asyncio.to_thread(run_example, redis_url)
    assert lines.count("pm got: done (approved)") == 1, lines
    assert set(lines) == EXPECTED | {"dev-1 got task: an old task"}, lines
    assert set(await asyncio.to_thread(run_example, redis_url)) == EXPECTED, "the backlog was worked off"
