"""Migration tools on in-process backends: dual-write, rollback by URL, and the bridge."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from squadbus.backends.dual import DualBackend, from_url
from squadbus.backends.dual.spool import Spool
from squadbus.backends.memory import MemoryBackend
from squadbus.core.backend import (
    Backend,
    BatchSubscriber,
    ConsumerOptions,
    Delivery,
    RawHandler,
    StartFrom,
    Subscription,
)
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message, build
from squadbus.core.errors import ConfigError, ConnectionLost, MessageTooLarge, PublishFailed
from squadbus.workers.bridge import BRIDGED_FROM, Bridge


async def _wait(check: object, what: str) -> None:
    async with asyncio.timeout(5):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_dual_writes_both_and_reads_the_primary() -> None:
    old, new = MemoryBackend(), MemoryBackend()
    async with Bus(DualBackend(old, new)) as bus:
        from_primary: list[Message] = []

        async def record(delivery: Delivery) -> None:
            from_primary.append(delivery.message)

        await bus.subscribe("agent.message.dev-1", record, group="g")
        execution = uuid.uuid4()
        sent = [await bus.send("pm", "dev-1", str(i), task_execution_id=execution) for i in range(3)]
        await _wait(lambda: len(from_primary) == 3, "primary delivery")
        # Roll forward: the new backend has every message, same ids, in order.
        on_new = [m async for _, m in new.replay(execution)]
        assert [m.id for m in on_new] == [m.id for m in sent]
        assert [m.id for m in from_primary] == [m.id for m in sent]


async def test_dual_write_fails_loudly_when_the_secondary_fails() -> None:
    old, new = MemoryBackend(), MemoryBackend()
    async with Bus(DualBackend(old, new)) as bus:
        await new.close()
        with pytest.raises(PublishFailed, match="retry with the same id"):
            await bus.send("pm", "dev-1", "x")


async def test_dual_publish_many_writes_the_batch_to_both_in_order() -> None:
    old, new = MemoryBackend(), MemoryBackend()
    async with Bus(DualBackend(old, new)) as bus:
        execution = uuid.uuid4()
        batch = [build(subject="agent.message.dev-1", sender_id="pm", content=str(i), task_execution_id=execution)
                 for i in range(5)]
        await bus.publish_many(batch)
        for backend in (old, new):
            assert [m.id async for _, m in backend.replay(execution)] == [m.id for m in batch]
        await new.close()
        with pytest.raises(PublishFailed, match="retry with the same ids"):
            await bus.publish_many(batch[:2])


class PlainBackend:
    """Only the core Backend protocol (no batch abilities), over a memory backend."""

    name = "plain"

    def __init__(self) -> None:
        self.inner = MemoryBackend()

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, message: Message) -> None:
        await self.inner.publish(message)

    async def subscribe(self, pattern: str, handler: RawHandler, *, group: str | None,
                        options: ConsumerOptions) -> Subscription:
        return await self.inner.subscribe(pattern, handler, group=group, options=options)

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize("native", [True, False], ids=["batch-primary", "plain-primary"])
async def test_dual_subscribe_batch_reads_batches_from_the_primary(native: bool) -> None:
    old: Backend = MemoryBackend() if native else PlainBackend()
    assert isinstance(old, BatchSubscriber) is native
    async with Bus(DualBackend(old, MemoryBackend())) as bus:
        batches: list[list[str]] = []

        async def handle(deliveries: Sequence[Delivery]) -> None:
            batches.append([d.message.content for d in deliveries])

        for i in range(20):
            await bus.send("pm", "dev-1", str(i))
        await bus.subscribe_batch("agent.message.dev-1", handle, group="writers", max_batch=8, max_wait=0.01)
        await _wait(lambda: sum(map(len, batches)) >= 20, "every message in batches")
        assert [c for b in batches for c in b] == [str(i) for i in range(20)]
        assert all(len(b) <= 8 for b in batches)
        assert len(batches) <= 10, "messages should arrive in batches, not one by one"


def test_dual_url() -> None:
    backend = from_url("dual://memory://|memory://?retain_messages=10")
    assert backend.name == "dual(memory|memory)"
    for bad in ("dual://memory://", "dual://|memory://", "dual://dual://a|b|c"):
        with pytest.raises(ConfigError):
            from_url(bad)


async def test_bus_from_dual_url() -> None:
    async with Bus.from_url("dual://memory://|memory://") as bus:
        await bus.send("pm", "dev-1", "hello")
        assert isinstance(bus.backend, DualBackend)


async def test_bridge_copies_everything_once_with_the_same_ids() -> None:
    async with Bus(MemoryBackend()) as source, Bus(MemoryBackend()) as destination:
        before = await source.send("pm", "dev-1", "sent before the bridge started")
        copied: list[Message] = []

        async def record(delivery: Delivery) -> None:
            copied.append(delivery.message)

        await destination.subscribe("agent.>", record, group="db-writer", options=ConsumerOptions(start=StartFrom.NEW))
        bridge = Bridge(source, destination)
        await bridge.start()
        after = [await source.send("pm", f"dev-{i}", "x") for i in range(5)]
        await _wait(lambda: len(copied) == 6, "six copies")
        await bridge.stop()
        assert [m.id for m in copied] == [before.id] + [m.id for m in after]
        assert all(m.headers[BRIDGED_FROM] == "memory" for m in copied)


async def test_bridge_retries_until_the_destination_takes_it() -> None:
    async with Bus(MemoryBackend()) as source:
        flaky_backend = MemoryBackend()
        destination = await Bus(flaky_backend).start()
        failures = [2]
        original = flaky_backend.publish

        async def sometimes_down(message: Message) -> None:
            if failures[0]:
                failures[0] -= 1
                raise PublishFailed("destination restarting")
            await original(message)

        flaky_backend.publish = sometimes_down  # type: ignore[method-assign]
        bridge = Bridge(source, destination)
        await bridge.start()
        sent = await source.send("pm", "dev-1", "must arrive")
        await _wait(lambda: bridge.copied == 1, "the copy after two failures")
        landed: list[Message] = []

        async def record(delivery: Delivery) -> None:
            landed.append(delivery.message)

        await destination.subscribe("agent.>", record, group="check")  # a new group reads what was retained
        await _wait(lambda: len(landed) == 1, "the copy on the destination")
        assert landed[0].id == sent.id
        assert flaky_backend.stats()["replay_window"]["retained"] == 1
        await bridge.stop()
        await destination.close()


# ---- dual:// secondary=spool (issue 17, item 4); the outage of a real server is in tests/nats/test_dual_spool.py


def test_dual_url_options() -> None:
    spooled = from_url("dual://memory://|memory://|secondary=spool&spool=/tmp/x.db&retry_max=2")
    assert spooled.spool is not None and str(spooled.spool.path) == "/tmp/x.db" and spooled.retry_max == 2
    assert from_url("dual://memory://|memory://").spool is None
    for bad, says in (("secondary=later", "fail or spool"), ("speed=1", "unknown dual:// option"),
                      ("spool=/tmp/x.db", "needs secondary=spool"), ("secondary=spool&retry_max=x", "number")):
        with pytest.raises(ConfigError, match=says):
            from_url(f"dual://memory://|memory://|{bad}")


def test_dual_default_spool_is_in_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SQUADBUS_DATA_DIR", str(tmp_path))
    spool = from_url("dual://memory://|redis://127.0.0.1:6379/0|secondary=spool").spool
    assert spool is not None and spool.path.parent == tmp_path and spool.path.name.startswith("dual-spool-")


async def test_one_process_per_spool_file(tmp_path: Path) -> None:
    first = DualBackend(MemoryBackend(), MemoryBackend(), spool=Spool(tmp_path / "s.db"))
    second = DualBackend(MemoryBackend(), MemoryBackend(), spool=Spool(tmp_path / "s.db"))
    await first.connect()
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            await second.connect()
    finally:
        await first.close()
    third = DualBackend(MemoryBackend(), MemoryBackend(), spool=Spool(tmp_path / "s.db"))
    await third.connect()  # free again once the first closed
    await third.close()


class _Refusing(MemoryBackend):
    """A secondary that is down until told otherwise and refuses one content for good."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def publish(self, message: Message) -> None:
        if self.down:
            raise ConnectionLost("secondary down")
        if message.content == "too big there":
            raise MessageTooLarge("over the secondary's limit")
        await super().publish(message)


async def test_spool_sets_aside_what_the_secondary_refuses_for_good_and_sends_the_rest(tmp_path: Path) -> None:
    old, new = MemoryBackend(), _Refusing()
    execution = uuid.uuid4()
    async with Bus(DualBackend(old, new, spool=Spool(tmp_path / "s.db"), retry_max=0.05)) as bus:
        sent = [await bus.send("pm", "dev-1", text, task_execution_id=execution)
                for text in ("a", "too big there", "b")]
        backend = bus.backend
        assert isinstance(backend, DualBackend)
        assert backend.figures()["dual_spool_depth"] == 3
        new.down = False
        await _wait(lambda: not backend.spooling, "the spool to drain")
        assert backend.figures()["dual_spool_depth"] == 0
        assert backend.figures()["dual_spool_refused"] == 1
        on_new = [m.id async for _, m in new.replay(execution)]
        assert on_new == [sent[0].id, sent[2].id]
        after = await bus.send("pm", "dev-1", "c", task_execution_id=execution)
        assert [m.id async for _, m in new.replay(execution)][-1] == after.id, "direct again once drained"
