"""``squadbus bridge`` and ``dual://`` to and from RabbitMQ against real servers, checked by ``squadbus
verify`` (child processes, as an operator runs them): Redis -> RabbitMQ and RabbitMQ -> Redis, each with
messages sent before the bridge started and while it copies; a dual-write with RabbitMQ as primary."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from squadbus.backends.dual import DualBackend
from squadbus.cli.verify import Holdings, compare
from squadbus.core.backend import ReadsAll
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.servers.process import spawn, stop
from squadbus.testing.servers.redis import RedisServer
from tests.cli.conftest import SQUADBUS, clean_env
from tests.migration.test_runbook import until, verify

pytestmark = [pytest.mark.rabbitmq, pytest.mark.redis]

WAIT = 30.0  # upper bound of a wait for the bridge to copy (never asserted as a timing)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A durable-profile redis-server for this module (a missing binary fails, never skips)."""
    with RedisServer("durable") as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def _read(path: Path) -> str:
    return path.read_text()


async def _send(url: str, count: int, executions: list[uuid.UUID], tag: str) -> list[Message]:
    async with Bus.from_url(url) as bus:
        return [await bus.send("pm", f"dev-{i % 3}", f"{tag}-{i}", task_execution_id=executions[i % len(executions)])
                for i in range(count)]


async def _bridge_and_verify(source: str, destination: str, data_dir: Path, log: Path) -> None:
    executions = [uuid.uuid4() for _ in range(3)]
    before = await _send(source, 30, executions, "before")
    bridge = spawn([*SQUADBUS, "bridge", "--from", source, "--to", destination, "--from-start"], log,
                   env=clean_env(data_dir))
    try:
        await until(lambda: log.exists() and "bridging" in _read(log), "the bridge starts")
        during = await _send(source, 20, executions, "during")

        async def copied() -> bool:
            return (await verify(data_dir, source, destination)).code == 0

        async with asyncio.timeout(WAIT):
            while not await copied():
                await asyncio.sleep(0.2)
    finally:
        stop(bridge)
    assert bridge.returncode == 0, _read(log)
    final = await verify(data_dir, source, destination)
    report = final.report
    assert final.code == 0 and report["match"], report
    assert report["from"]["messages"] == report["to"]["messages"] == len(before) + len(during), report
    assert report["order"]["count"] == 0, report


async def test_bridge_redis_to_rabbitmq(redis_url: str, rabbitmq_url: str, data_dir: Path, tmp_path: Path) -> None:
    await _bridge_and_verify(redis_url, rabbitmq_url, data_dir, tmp_path / "bridge.log")


async def test_bridge_rabbitmq_to_redis(redis_url: str, rabbitmq_url: str, data_dir: Path, tmp_path: Path) -> None:
    await _bridge_and_verify(rabbitmq_url, redis_url, data_dir, tmp_path / "bridge.log")


async def _held(backend: object) -> Holdings:
    assert isinstance(backend, ReadsAll)
    held = Holdings()
    async for message in backend.read_all("agent.>"):
        held.add(message)
    return held


async def test_dual_write_with_rabbitmq_as_primary(redis_url: str, rabbitmq_url: str) -> None:
    executions = [uuid.uuid4() for _ in range(2)]
    async with Bus.from_url(f"dual://{rabbitmq_url}|{redis_url}") as bus:
        sent = [await bus.send("pm", "dev-1", f"m{i}", task_execution_id=executions[i % 2]) for i in range(20)]
        dual = bus.backend
        assert isinstance(dual, DualBackend)
        primary, secondary = await _held(dual.primary), await _held(dual.secondary)
    report = compare(primary, secondary)
    assert (report.missing, report.extra, report.order) == ({}, {}, {}), report
    assert set(primary.execution_of) == {m.id for m in sent}
