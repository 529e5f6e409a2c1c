"""The README's example (examples/squad.py) on RabbitMQ, run twice over backlog left by the first run."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.core.bus import Bus
from tests.core.test_readme import EXPECTED, run_example

pytestmark = pytest.mark.rabbitmq


async def test_example_prints_its_own_reply_over_old_backlog(rabbitmq_url: str) -> None:
    # The example's agent ids (pm, dev-1, reviewer) are fixed: the URL's namespace is this test's own.
    assert set(await asyncio.to_thread(run_example, rabbitmq_url)) == EXPECTED
    async with Bus.from_url(rabbitmq_url) as bus:
        await bus.send("dev-1", "pm", "done (left over)", "status", task_execution_id=uuid.uuid4())
        await bus.send("pm", "dev-1", "an old task", "task", task_execution_id=uuid.uuid4())
    lines = await asyncio.to_thread(run_example, rabbitmq_url)
    assert lines.count("pm got: done (approved)") == 1, lines
    assert set(lines) == EXPECTED | {"dev-1 got task: an old task"}, lines
