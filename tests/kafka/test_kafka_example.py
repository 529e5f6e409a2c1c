"""The README's example (examples/squad.py) on a private tansu broker that holds backlog from earlier runs."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.servers.kafka import TansuServer
from tests.core.test_readme import EXPECTED, run_example
from tests.kafka.conftest import GROUP_OPTIONS

pytestmark = pytest.mark.kafka


async def test_example_prints_its_own_reply_over_old_backlog() -> None:
    # A broker of its own: the example's agent ids (pm, dev-1, reviewer) are fixed.
    with TansuServer() as server:
        url = f"{server.url}?partitions=4&idempotence=off&{GROUP_OPTIONS}"
        assert set(await asyncio.to_thread(run_example, url)) == EXPECTED
        async with Bus.from_url(url) as bus:
            await bus.send("dev-1", "pm", "done (left over)", "status", task_execution_id=uuid.uuid4())
            await bus.send("pm", "dev-1", "an old task", "task", task_execution_id=uuid.uuid4())
        lines = await asyncio.to_thread(run_example, url)
        assert lines.count("pm got: done (approved)") == 1, lines
        assert set(lines) == EXPECTED | {"dev-1 got task: an old task"}, lines
