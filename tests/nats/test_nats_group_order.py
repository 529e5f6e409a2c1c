"""Order per execution across the members of one NATS consumer group (issue 17), with ``ordered_groups``.

The group's consumer has the ``pinned_client`` priority policy: one member receives at a time, and
another is pinned only after ``2 * ack_wait`` without a pull from it, by when a dead member's unacked
messages have passed their ack wait and are redelivered, first, to the new one. Two members of one group,
one in a process of its own that is killed with kill -9 mid-way: every acknowledged message completed,
each execution's first completions in send order.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import pytest

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.testing import ledger_consumer
from squadbus.testing.conformance import eventually
from squadbus.testing.ledger import Ledger

pytestmark = pytest.mark.nats

ACK_WAIT = 1.0
WAIT = 30.0


def _ordered(url: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}ordered_groups=true"


async def _member(url: str, group: str, pattern: str, log: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", ledger_consumer.MODULE, url, group, pattern, str(log), "victim", str(ACK_WAIT))
    await eventually(lambda: (log.exists() and "ready" in log.read_text()) or proc.returncode is not None,
                     WAIT, "the member in its own process to join")
    assert proc.returncode is None, f"the member exited with {proc.returncode}"
    return proc


async def test_order_per_execution_across_two_members_and_a_kill9(nats_url: str, tmp_path: Path) -> None:
    url = _ordered(nats_url)
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    log = tmp_path / "victim.log"
    ledger = Ledger()
    victim = await _member(url, group, pattern, log)
    try:
        async with Bus.from_url(url) as bus:
            async def handle(delivery: Delivery) -> None:
                await asyncio.sleep(0.005)
                ledger.completed(delivery.message, "survivor", delivery.attempt)

            await bus.subscribe(pattern, handle, group=group, options=ConsumerOptions(ack_wait=ACK_WAIT))
            executions = [uuid.uuid4() for _ in range(16)]

            async def produce() -> None:
                for i in range(300):
                    await ledger.send(bus, "p", agent, executions[i % len(executions)])
                    await asyncio.sleep(0.004)

            producing = asyncio.create_task(produce())
            await eventually(lambda: log.read_text().count("\n") > 20 or producing.done(), WAIT,
                             "the member in its own process to complete some messages")
            victim.kill()
            await victim.wait()
            await producing
            await eventually(lambda: ledger.acknowledged <= ledger.done() | _done_in(log), WAIT,
                             "every acknowledged message completed by a member")
    finally:
        if victim.returncode is None:
            victim.kill()
            await victim.wait()
    ledger.load(log)
    report = ledger.check("consumer kill -9 in a group of two", "nats")
    assert report.lost == 0, report.lost_ids
    assert report.acknowledged == report.sent == 300
    assert {c.consumer for c in ledger.completions} == {"victim", "survivor"}, "both members should handle some"
    assert report.order_violations == 0, report


async def test_a_group_consumer_keeps_its_policy(nats_url: str) -> None:
    """A consumer cannot change priority policy: joining it with the other setting is a clear error."""
    group, pattern = f"g-{uuid.uuid4().hex[:8]}", subjects.direct(f"agent-{uuid.uuid4().hex[:8]}")

    async def nothing(delivery: Delivery) -> None:
        return None

    async with Bus.from_url(nats_url) as plain, Bus.from_url(_ordered(nats_url)) as ordered:
        await plain.subscribe(pattern, nothing, group=group)
        with pytest.raises(ConfigError, match="pinned_client"):
            await ordered.subscribe(pattern, nothing, group=group)


def _done_in(log: Path) -> set[uuid.UUID]:
    scratch = Ledger()
    scratch.load(log)
    return scratch.done()

