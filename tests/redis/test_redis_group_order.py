"""Order per execution across the members of one Redis consumer group (issue 17).

Two members of one group, one in a process of its own, share many interleaved executions; the one
in its own process is killed with kill -9 mid-way. Every acknowledged message must be completed, and
within each execution the first completions must follow the send order: each partition (stream) is
served by one member at a time, and a member taking one over delivers the previous owner's pending
entries before new ones.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import redis as sync_redis
from squadbus.backends.redis import RedisSettings
from squadbus.backends.redis.consumer import RedisSubscription
from squadbus.backends.redis.group import GroupSource
from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, durable_name
from squadbus.core.bus import Bus
from squadbus.testing import ledger_consumer
from squadbus.testing.conformance import eventually
from squadbus.testing.ledger import Ledger

pytestmark = pytest.mark.redis

ACK_WAIT = 1.0
WAIT = 30.0


async def _member(url: str, group: str, pattern: str, log: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", ledger_consumer.MODULE, url, group, pattern, str(log), "victim", str(ACK_WAIT))
    await eventually(lambda: (log.exists() and "ready" in log.read_text()) or proc.returncode is not None,
                     WAIT, "the member in its own process to join")
    assert proc.returncode is None, f"the member exited with {proc.returncode}"
    return proc


@pytest.mark.parametrize("wildcard", [True, False], ids=["partition-streams", "subject-stream"])
async def test_order_per_execution_across_two_members_and_a_kill9(
    redis_url: str, tmp_path: Path, wildcard: bool
) -> None:
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.MESSAGE_PREFIX + ".*" if wildcard else subjects.direct(agent)
    log = tmp_path / "victim.log"
    ledger = Ledger()
    victim = await _member(redis_url, group, pattern, log)
    try:
        async with Bus.from_url(redis_url) as bus:
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
    report = ledger.check("consumer kill -9 in a group of two", "redis")
    assert report.lost == 0, report.lost_ids
    assert report.acknowledged == report.sent == 300
    assert {c.consumer for c in ledger.completions} == {"victim", "survivor"}, "both members should handle some"
    assert report.order_violations == 0, report


async def test_members_split_the_partitions_and_each_execution_stays_in_order(redis_url: str) -> None:
    """Two members of a wildcard group share the partition streams (both get work, nothing twice); a
    member that closes gives its partitions to the other at once; every execution is handled in order."""
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.MESSAGE_PREFIX + ".*"
    handled: list[tuple[str, uuid.UUID | None, int]] = []  # in the order the handlers ran (one loop)

    def collect(name: str) -> Callable[[Delivery], Awaitable[None]]:
        async def handle(delivery: Delivery) -> None:
            handled.append((name, delivery.message.task_execution_id, int(delivery.message.content)))
            await asyncio.sleep(0.002)
        return handle

    settings = RedisSettings.from_url(redis_url)
    leases = f"{settings.prefix}:glease:{durable_name(group, pattern)}:*"
    owners = 0
    stop = asyncio.Event()

    async def count_owners() -> None:
        nonlocal owners
        client = aioredis.Redis(host=settings.host, port=settings.port)
        try:
            while not stop.is_set():
                keys = [key async for key in client.scan_iter(leases)]
                owners = len(set(await client.mget(keys))) if keys else 0
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    counting = asyncio.create_task(count_owners())
    async with Bus.from_url(redis_url) as bus_a, Bus.from_url(redis_url) as bus_b:
        options = ConsumerOptions(ack_wait=1.0)
        await bus_a.subscribe(pattern, collect("a"), group=group, options=options)
        sub_b = await bus_b.subscribe(pattern, collect("b"), group=group, options=options)
        await eventually(lambda: owners == 2, WAIT, "the partitions to be shared by the two members")
        executions = [uuid.uuid4() for _ in range(32)]
        for i in range(200):
            await bus_a.send("pm", agent, str(i), task_execution_id=executions[i % len(executions)])
        await eventually(lambda: len(handled) >= 200, WAIT, "the group to get all 200")
        assert {name for name, _, _ in handled} == {"a", "b"}, "both members should serve partitions"
        await sub_b.close()
        for i in range(200, 264):
            await bus_a.send("pm", agent, str(i), task_execution_id=executions[i % len(executions)])
        await eventually(lambda: len(handled) >= 264, WAIT, "the member left to take the closed one's partitions")
    stop.set()
    await asyncio.wait_for(counting, WAIT)
    assert sorted(n for _, _, n in handled) == list(range(264)), "each message once"
    by_execution: dict[uuid.UUID | None, list[int]] = {}
    for _, execution, n in handled:
        by_execution.setdefault(execution, []).append(n)
    assert all(ns == sorted(ns) for ns in by_execution.values()), "each execution in send order"


async def test_a_member_paused_past_its_lease_stops_serving_the_partition(redis_url: str) -> None:
    """A member whose process stalled past ack_wait (its lease expired and another member took the
    partition) hands out nothing more from it, and serves it again only once it holds the lease again."""
    agent, group = f"agent-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    pattern = subjects.direct(agent)
    settings = RedisSettings.from_url(redis_url)
    lease = f"{settings.prefix}:glease:{durable_name(group, pattern)}:0"
    got: list[str] = []

    async def handle(delivery: Delivery) -> None:
        got.append(delivery.message.content)

    def take_the_lease_and_send() -> None:  # another member and a producer, while this process stands still
        with sync_redis.Redis(host=settings.host, port=settings.port) as client:
            client.set(lease, "another-member")

        async def send() -> None:
            async with Bus.from_url(redis_url) as producer:
                await producer.send("pm", agent, "while another member holds the partition")

        asyncio.run(send())

    async with Bus.from_url(redis_url) as bus:
        sub = await bus.subscribe(pattern, handle, group=group, options=ConsumerOptions(ack_wait=1.0))
        assert isinstance(sub, RedisSubscription) and isinstance(sub.source, GroupSource)
        await bus.send("pm", agent, "before")
        await eventually(lambda: got == ["before"], WAIT, "the first message")
        taker = threading.Timer(1.2, take_the_lease_and_send)
        taker.start()
        time.sleep(1.5)  # noqa: ASYNC251 - the whole process stalls (a GC pause, SIGSTOP), on purpose
        taker.join()
        # Its read of before the stall answers late and its next one would find the new message: the
        # lease deadline has passed, so it must not hand anything out.
        await asyncio.sleep(1.0)  # three renewals: none may take it back, nothing may be read
        assert got == ["before"]
        client = aioredis.Redis(host=settings.host, port=settings.port)
        try:
            await client.delete(lease)  # the other member is gone: its lease ends
        finally:
            await client.aclose()
        await eventually(lambda: len(got) == 2, WAIT, "the partition served again once its lease is free")
        assert got == ["before", "while another member holds the partition"]


def _done_in(log: Path) -> set[uuid.UUID]:
    scratch = Ledger()
    scratch.load(log)
    return scratch.done()
