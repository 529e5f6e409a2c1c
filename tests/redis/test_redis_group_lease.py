"""A lone member of an ordered Redis group whose process died, restarted: the new member reads new
messages once the dead one's partition leases lapse (``group_lease``), not after ``ack_wait``."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from pathlib import Path

import pytest

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.testing import ledger_consumer
from squadbus.testing.conformance import eventually

pytestmark = pytest.mark.redis

ACK_WAIT = 120.0
WAIT = 30.0


async def test_a_restarted_lone_member_reads_after_the_group_lease_not_ack_wait(
    redis_url: str, tmp_path: Path
) -> None:
    url = redis_url + "&group_lease=1"
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "crashed.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", ledger_consumer.MODULE, url, group, subjects.direct(agent), str(log), "crashed",
        str(ACK_WAIT))
    try:
        await eventually(lambda: (log.exists() and "ready" in log.read_text()) or proc.returncode is not None,
                         WAIT, "the first member to join")
        assert proc.returncode is None, f"the first member exited with {proc.returncode}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()

    async with Bus.from_url(url) as bus:
        got: asyncio.Queue[Delivery] = asyncio.Queue()

        async def handle(delivery: Delivery) -> None:
            got.put_nowait(delivery)

        await bus.subscribe(subjects.direct(agent), handle, group=group, options=ConsumerOptions(ack_wait=ACK_WAIT))
        sent = await bus.send("pm", agent, "after the crash")
        # The dead member's lease lapses after 1 s; with ack_wait as the lease it would be 120 s.
        delivery = await asyncio.wait_for(got.get(), WAIT)
        assert delivery.message.id == sent.id
