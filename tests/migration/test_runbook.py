"""The migration runbook of docs/migration.md, step by step, against real servers (issue 17).

A producer sends about 100 messages a second over four executions for the whole test, through
whatever URL it is deployed with; a redeploy (:meth:`Producer.switch`) finishes the send in progress,
closes its Bus and opens a new one. One consumer group (``workers``) records every message its
handler completed, per side. At each step ``squadbus verify`` runs as a child process while the
producer writes, and its exit code and JSON report are checked: every message acknowledged before
verify started is on both sides, and what it lists beyond that was in flight (the next run does not
list it again). Timings are never asserted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from squadbus.backends.dual import DualBackend
from squadbus.cli.verify import Holdings, compare
from squadbus.core.backend import ConsumerOptions, Delivery, ReadsAll, StartFrom
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import SquadbusError
from squadbus.testing.servers.process import spawn, stop
from tests.cli.conftest import SQUADBUS, clean_env

pytestmark = [pytest.mark.redis, pytest.mark.nats, pytest.mark.kafka, pytest.mark.slow]

RATE = 100.0  # messages a second
PHASE = 1.0  # seconds of steady sending between two steps
PATTERN = "agent.>"
GROUP = "workers"
WAIT = 30.0  # upper bound of any wait for messages to arrive (never asserted as a timing)


# ---- the producer and the consumer group -----------------------------------------------------------


class Producer:
    """Sends ``RATE`` messages a second, round-robin over a few executions, through one Bus at a time."""

    def __init__(self, url: str, executions: int = 4) -> None:
        self.url = url
        self.executions = [uuid.uuid4() for _ in range(executions)]
        self.acked: list[Message] = []
        self.failures: list[str] = []
        self.bus: Bus | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.bus = await Bus.from_url(self.url).start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at, n = loop.time(), 0
        while not self._stopping:
            async with self._lock:
                assert self.bus is not None
                try:
                    message = await self.bus.send("pm", f"dev-{n % 3}", f"m{n}",
                                                  task_execution_id=self.executions[n % len(self.executions)])
                except SquadbusError as exc:  # not acknowledged: recorded, and the test fails on it
                    self.failures.append(f"send {n} via {self.url}: {type(exc).__name__}: {exc}")
                else:
                    self.acked.append(message)
            n += 1
            next_at = max(next_at + 1 / RATE, loop.time())
            await asyncio.sleep(next_at - loop.time())

    async def switch(self, url: str, then: Callable[[Bus], Awaitable[None]] | None = None) -> datetime:
        """Redeploy on ``url``: returns a moment after the old Bus closed and before the new one sent
        anything (every message of the new deployment is created at or after it). ``then`` runs on the
        new Bus before it sends (an in-process consumer restarted with it)."""
        async with self._lock:
            assert self.bus is not None
            await self.bus.close()
            moment = datetime.now(UTC)
            self.bus = await Bus.from_url(url).start()
            self.url = url
            if then is not None:
                await then(self.bus)
        return moment

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await self._task
        if self.bus is not None:
            await self.bus.close()

    def ids(self, since: datetime | None = None) -> list[uuid.UUID]:
        return [m.id for m in self.acked if since is None or m.created_at >= since]

    def dual_figures(self) -> dict[str, float]:
        assert self.bus is not None and isinstance(self.bus.backend, DualBackend)
        return dict(self.bus.backend.figures())


class Group:
    """The consumer group ``workers`` on ``agent.>``: its handler records every id it completes, per side."""

    def __init__(self) -> None:
        self.completed: dict[str, list[uuid.UUID]] = {}
        self._buses: dict[str, Bus] = {}

    def handler(self, side: str, pause: float = 0.0) -> Callable[[Delivery], Awaitable[None]]:
        """Records each id it completes; ``pause`` seconds of work each (a group slower than the producer)."""
        done = self.completed.setdefault(side, [])

        async def handle(delivery: Delivery) -> None:
            if pause:
                await asyncio.sleep(pause)
            done.append(delivery.message.id)

        return handle

    async def join(self, side: str, url: str, start: StartFrom = StartFrom.EARLIEST) -> None:
        bus = await Bus.from_url(url).start()
        await bus.subscribe(PATTERN, self.handler(side), group=GROUP,
                            options=ConsumerOptions(start=start, ack_wait=5.0))
        self._buses[side] = bus

    async def leave(self, side: str) -> None:
        await self._buses.pop(side).close()

    async def close(self) -> None:
        for side in list(self._buses):
            await self.leave(side)

    def seen(self) -> set[uuid.UUID]:
        return {i for ids in self.completed.values() for i in ids}


async def until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


async def move_group(group: Group, producer: Producer, new_url: str) -> None:
    """Step 3: the group starts on the new side at NEW while the old one still runs; the old one
    leaves once it has completed everything acknowledged before the new one existed."""
    await group.join("new", new_url, start=StartFrom.NEW)
    cut = set(producer.ids())
    await until(lambda: cut <= set(group.completed["old"]), "the old group completes what came before the cut")
    await group.leave("old")


# ---- verify ------------------------------------------------------------------------------------------


@dataclass
class Verified:
    code: int
    report: dict[str, Any]

    def listed(self) -> set[str]:
        """Every id the report lists as missing or extra."""
        return {item["id"] for part in ("missing", "extra") for item in self.report[part]["ids"]}


async def verify(data_dir: Path, source: str, destination: str, since: datetime | None = None) -> Verified:
    """``squadbus verify --json`` in a child process (killed by PID if it hangs)."""
    args = [*SQUADBUS, "verify", "--from", source, "--to", destination, "--json", "--show", "1000000"]
    if since is not None:
        args += ["--since", since.isoformat()]
    proc = await asyncio.create_subprocess_exec(*args, env=clean_env(data_dir), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode in (0, 1), f"verify exit {proc.returncode}: {err.decode()}"
    report = json.loads(out)
    assert report["match"] is (proc.returncode == 0), report
    assert report["missing"]["count"] == len(report["missing"]["ids"])  # --show listed every id
    assert report["extra"]["count"] == len(report["extra"]["ids"])
    return Verified(proc.returncode, report)


async def verify_while_writing(data_dir: Path, source: str, destination: str, since: datetime,
                               producer: Producer) -> Verified:
    """The runbook's check while producers write: exit 0, or exit 1 listing only messages in flight.

    Every message acknowledged before verify started is on both sides (dual-write acknowledges a
    send once both stored it), nothing is out of order, and a second run does not list again what
    the first listed: those had been stored on one side only at the instant of the snapshots.
    """
    before = {str(i) for i in producer.ids(since)}
    first = await verify(data_dir, source, destination, since)
    assert first.report["order"]["count"] == 0, first.report
    assert not first.listed() & before, f"acknowledged before verify, listed as a difference: {first.report}"
    assert first.report["from"]["messages"] >= len(before)
    if first.code == 0:
        return first
    second = await verify(data_dir, source, destination, since)
    assert second.report["order"]["count"] == 0, second.report
    assert not first.listed() & second.listed(), f"a difference that stays: {first.report} then {second.report}"
    assert first.listed() <= {str(i) for i in producer.ids()}, "every listed id was sent and acknowledged"
    return second


def assert_clean_dual(producer: Producer) -> None:
    """What to watch while dual-writing: the spool stays empty and the secondary never failed."""
    figures = producer.dual_figures()
    watched = ("dual_secondary_failures", "dual_spool_depth", "dual_spool_refused")
    assert {k: figures.get(k) for k in watched} == dict.fromkeys(watched, 0), figures


# ---- blue-green: Redis -> NATS and Redis -> Kafka ------------------------------------------------------


async def blue_green(old: str, new: str, data_dir: Path) -> None:
    producer, group = Producer(old), Group()
    await producer.start()
    await group.join("old", old)
    try:
        await asyncio.sleep(PHASE)  # before the migration: old alone

        # 1. dual-write with the spool.
        began = await producer.switch(f"dual://{old}|{new}|secondary=spool&spool={data_dir / 'forward.db'}")
        before_dual = producer.ids()
        await asyncio.sleep(PHASE)
        assert_clean_dual(producer)

        # 2. verify old -> new since the dual-write began; without --since the older messages are missing.
        await verify_while_writing(data_dir, old, new, began, producer)
        whole = await verify(data_dir, old, new)
        assert whole.code == 1
        assert {str(i) for i in before_dual} <= {item["id"] for item in whole.report["missing"]["ids"]}

        # 3. move the consumer group to the new side; verify before the producers move.
        await move_group(group, producer, new)
        await asyncio.sleep(PHASE)
        await verify_while_writing(data_dir, old, new, began, producer)
        assert_clean_dual(producer)

        # 4. producers to the new side: the reverse dual-write first, new alone after step 5.
        await producer.switch(f"dual://{new}|{old}|secondary=spool&spool={data_dir / 'reverse.db'}")
        await asyncio.sleep(PHASE)
        assert_clean_dual(producer)

        # 5. verify again, then retire the old side: producers on the new URL alone.
        await verify_while_writing(data_dir, old, new, began, producer)
        retired = await producer.switch(new)
        await asyncio.sleep(PHASE)
    finally:
        await producer.stop()
    try:
        assert not producer.failures, producer.failures
        acked = set(producer.ids())
        await until(lambda: acked <= group.seen(), "the group completes every acknowledged message")
    finally:
        await group.close()

    # At the end: old -> new since the dual-write began misses nothing; the only extras are what was
    # sent after the old side was retired, so over the dual-write window nothing is missing or extra.
    final = await verify(data_dir, old, new, began)
    assert final.report["missing"]["count"] == 0, final.report
    assert final.report["order"]["count"] == 0, final.report
    assert {item["id"] for item in final.report["extra"]["ids"]} == {str(i) for i in producer.ids(retired)}
    assert final.report["from"]["messages"] == len(producer.ids(began)) - len(producer.ids(retired))
    assert final.report["to"]["messages"] == len(producer.ids(began))


async def test_redis_to_nats_blue_green(redis_url: str, nats_url: str, data_dir: Path) -> None:
    await blue_green(redis_url, nats_url, data_dir)


async def test_redis_to_kafka_blue_green(redis_url: str, kafka_url: str, data_dir: Path) -> None:
    await blue_green(redis_url, kafka_url, data_dir)


# ---- rollback after the consumers moved ----------------------------------------------------------------


async def test_rollback_after_moving_the_group_loses_nothing(redis_url: str, nats_url: str, data_dir: Path) -> None:
    old, new = redis_url, nats_url
    producer, group = Producer(old), Group()
    await producer.start()
    await group.join("old", old)
    try:
        await asyncio.sleep(PHASE / 2)
        began = await producer.switch(f"dual://{old}|{new}|secondary=spool&spool={data_dir / 'forward.db'}")
        await asyncio.sleep(PHASE)
        await verify_while_writing(data_dir, old, new, began, producer)
        await move_group(group, producer, new)
        left_old = len(producer.acked)  # the old group has left the old side by now
        await asyncio.sleep(PHASE)

        # Roll back: the group back to the old URL (it resumes where it left the old side), producers
        # stay on the dual-write.
        await group.join("old", old)
        await group.leave("new")
        await asyncio.sleep(PHASE)
        assert_clean_dual(producer)
    finally:
        await producer.stop()
    try:
        assert not producer.failures, producer.failures
        acked = set(producer.ids())
        await until(lambda: acked <= group.seen(), "the group completes every acknowledged message")
        # The old group resumed from its position on the old side: it gets everything sent after it
        # left, including what only the new group had handled meanwhile.
        after = set(producer.ids()[left_old:])
        await until(lambda: after <= set(group.completed["old"]), "the old group catches up after the rollback")
    finally:
        await group.close()
    final = await verify(data_dir, old, new, began)
    assert (final.code, final.report["missing"]["count"], final.report["extra"]["count"]) == (0, 0, 0), final.report
    assert final.report["from"]["messages"] == len(producer.ids(began))


# ---- the bridge when producers cannot change ----------------------------------------------------------


async def test_bridge_redis_to_nats(redis_url: str, nats_url: str, data_dir: Path, tmp_path: Path) -> None:
    old, new = redis_url, nats_url
    producer, group = Producer(old), Group()
    await producer.start()
    await group.join("old", old)
    log = tmp_path / "bridge.log"
    bridge = spawn([*SQUADBUS, "bridge", "--from", old, "--to", new, "--from-start"], log, env=clean_env(data_dir))
    try:
        try:
            await asyncio.sleep(PHASE)
            # Verify old -> new while the producer writes old and the bridge copies: what it lists is
            # what the bridge had not copied yet, and is not listed again by the next run.
            await until(lambda: log.exists() and "bridging" in log.read_text(), "the bridge starts")
            first = await verify(data_dir, old, new)
            assert first.report["order"]["count"] == 0 and first.report["extra"]["count"] == 0, first.report
            second = await verify(data_dir, old, new)
            assert not first.listed() & second.listed(), (first.report, second.report)

            await move_group(group, producer, new)
            await asyncio.sleep(PHASE)
            # Producers move when they can (their next deployment); the bridge then copies what is left.
            moved = await producer.switch(new)
            await asyncio.sleep(PHASE)
        finally:
            await producer.stop()
        on_old = set(producer.ids()) - set(producer.ids(moved))

        async def copied() -> bool:
            missing: int = (await verify(data_dir, old, new)).report["missing"]["count"]
            return missing == 0

        async with asyncio.timeout(WAIT):
            while not await copied():
                await asyncio.sleep(0.2)
    finally:
        stop(bridge)
    assert bridge.returncode == 0, log.read_text()
    assert "copied" in log.read_text()
    try:
        assert not producer.failures, producer.failures
        acked = set(producer.ids())
        await until(lambda: acked <= group.seen(), "the group completes every acknowledged message")
    finally:
        await group.close()
    final = await verify(data_dir, old, new)
    assert (final.report["missing"]["count"], final.report["order"]["count"]) == (0, 0), final.report
    assert {item["id"] for item in final.report["extra"]["ids"]} == {str(i) for i in producer.ids(moved)}
    assert final.report["from"]["messages"] == len(on_old)


# ---- memory -> Redis: one process, restarted twice -------------------------------------------------------


async def _held(backend: object, since: datetime) -> Holdings:
    assert isinstance(backend, ReadsAll)
    held = Holdings()
    async for message in backend.read_all(PATTERN, since=since):
        held.add(message)
    return held


async def test_memory_to_redis_restarts_the_process(redis_url: str, data_dir: Path) -> None:
    producer, group = Producer("memory://"), Group()
    await producer.start()
    assert producer.bus is not None

    async def consume(side: str, bus: Bus) -> None:
        # On memory the group handles at most 50 a second of the producer's 100: it keeps a backlog.
        pause = 0.02 if side == "memory" else 0.0
        await bus.subscribe(PATTERN, group.handler(side, pause), group=GROUP, options=ConsumerOptions(ack_wait=5.0))

    await consume("memory", producer.bus)
    try:
        await asyncio.sleep(PHASE / 2)
        # Restart with dual://memory://|redis://: what memory held unconsumed goes with the process.
        began = await producer.switch(f"dual://memory://|{redis_url}|secondary=spool&spool={data_dir / 's.db'}",
                                      lambda bus: consume("memory", bus))
        lost = set(producer.ids()) - set(producer.ids(began)) - set(group.completed["memory"])
        await asyncio.sleep(PHASE)
        assert_clean_dual(producer)

        # Verify in-process (memory:// cannot be read from another process): memory -> Redis since the
        # dual-write began; all acknowledged before the check are on both.
        assert producer.bus is not None and isinstance(producer.bus.backend, DualBackend)
        dual = producer.bus.backend
        before = set(producer.ids(began))
        report = compare(await _held(dual.primary, began), await _held(dual.secondary, began))
        # The producer keeps sending between the two reads: only what was sent before them must match.
        assert not report.order, report
        assert not {i for ids in report.missing.values() for i in ids} & before, report.missing
        assert not {i for ids in report.extra.values() for i in ids} & before, report.extra

        # Restart with redis:// alone: the group is new on Redis and starts at its first message, which
        # is the first of the dual-write, so it sees again what it handled from memory (idempotent
        # handlers) and misses nothing written since the dual-write began.
        await producer.switch(redis_url, lambda bus: consume("redis", bus))
        backlog = set(producer.ids(began)) - set(group.completed["memory"])  # memory held it, unconsumed
        await asyncio.sleep(PHASE)
    finally:
        await producer.stop()
    assert not producer.failures, producer.failures
    assert lost and backlog, "the slow group left a backlog in memory at each restart"
    assert lost.isdisjoint(producer.ids(began)), "only what memory held at the first restart is lost"
    since_dual = set(producer.ids(began))
    # The process stopped with the group's own backlog on Redis: a consumer started again drains it.
    await group.join("redis", redis_url)
    try:
        await until(lambda: since_dual <= set(group.completed["memory"]) | set(group.completed["redis"]),
                    "the group on Redis has every message since the dual-write began")
    finally:
        await group.close()
    assert backlog <= set(group.completed["redis"]), "the dual-write's backlog is read again from Redis"
    assert set(producer.ids()) - group.seen() == lost, "the group missed only what memory lost"
    async with Bus.from_url(redis_url) as redis:
        on_redis = await _held(redis.backend, began)
    assert set(on_redis.execution_of) == since_dual, "Redis holds exactly what was sent since the dual-write"
