"""The README's example (examples/squad.py) on a private JetStream server that holds backlog from earlier runs."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.servers.nats import NatsServer
from tests.core.test_readme import EXPECTED, run_example

pytestmark = pytest.mark.nats


async def test_example_prints_its_own_reply_over_old_backlog(tmp_path: Path) -> None:
    # A server of its own: the example's agent ids (pm, dev-1, reviewer) are fixed.
    with NatsServer(tmp_path) as server:
        assert set(await asyncio.to_thread(run_example, server.url)) == EXPECTED
        async with Bus.from_url(server.url) as bus:
            await bus.send("dev-1", "pm", "done (left over)", "status", task_execution_id=uuid.uuid4())
            await bus.send("pm", "dev-1", "an old task", "task", task_execution_id=uuid.uuid4())
        lines = await asyncio.to_thread(run_example, server.url)
        assert lines.count("pm got: done (approved)") == 1, lines
        assert set(lines) == EXPECTED | {"dev-1 got task: an old task"}, lines
