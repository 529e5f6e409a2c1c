"""``squadbus verify`` between real brokers: Redis → NATS after ``squadbus bridge --from-start``,
Redis → Kafka (tansu) written to both with some messages skipped, added or swapped, and a run while a
producer keeps writing (issue 17 item 5). Each test uses its own prefix, stream or topic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest

from squadbus.core import envelope
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.testing.servers.kafka import TansuServer
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.process import spawn, stop, wait_until
from tests.cli.conftest import SQUADBUS, clean_env, run_cli

pytestmark = [pytest.mark.redis, pytest.mark.nats, pytest.mark.kafka]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server per test: every stream holds ``agent.>``, so a server has one squadbus stream."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture(scope="module")
def tansu() -> Iterator[TansuServer]:
    server = TansuServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def _send(url: str, count: int, executions: list[uuid.UUID]) -> list[Message]:
    """``count`` messages on ``url``: every tenth without an execution, the rest spread over ``executions``."""
    async with Bus.from_url(url) as bus:
        return [
            await bus.send("pm", f"dev-{i % 3}", f"m{i}",
                           task_execution_id=None if i % 10 == 0 else executions[i % len(executions)])
            for i in range(count)
        ]


async def _stream_state(url: str, stream: str) -> tuple[int, list[str]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:  # the bridge has not created it yet
            return 0, []
        consumers = [c.name for c in await js.consumers_info(stream)]
        return info.state.messages, consumers
    finally:
        await nc.close()


async def _delete_on_nats(url: str, stream: str, seqs: list[int]) -> list[str]:
    """Delete the messages at ``seqs``; returns their ids."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        ids = []
        for seq in seqs:
            raw = await js.get_msg(stream, seq)
            assert raw.data is not None
            ids.append(json.loads(raw.data)["id"])
            await js.delete_msg(stream, seq)
        return ids
    finally:
        await nc.close()


def _verify(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["verify", *args], clean_env(tmp_path / "data"), timeout=120)


def test_redis_to_nats_after_the_bridge_matches_then_names_exactly_the_deleted(
    redis_url: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    stream = f"v{uuid.uuid4().hex[:10]}"
    nats_url = f"{nats_server.url}?stream={stream}"
    sent = asyncio.run(_send(redis_url, 300, [uuid.uuid4() for _ in range(5)]))
    bridge = spawn([*SQUADBUS, "bridge", "--from", redis_url, "--to", nats_url, "--from-start"],
                   tmp_path / "bridge.log", env=clean_env(tmp_path / "data"))
    try:
        wait_until(lambda: asyncio.run(_stream_state(nats_server.url, stream))[0] == len(sent), 60,
                   f"the bridge to copy {len(sent)} messages (log {tmp_path / 'bridge.log'})", bridge)
    finally:
        stop(bridge)

    same = _verify(tmp_path, "--from", redis_url, "--to", nats_url)
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.rstrip().endswith("match")
    assert "executions checked 6, differing 0" in same.stdout  # 5 executions and "none"

    deleted = asyncio.run(_delete_on_nats(nats_server.url, stream, [1, 42, 300]))
    differ = _verify(tmp_path, "--from", redis_url, "--to", nats_url, "--json")
    assert differ.returncode == 1, differ.stdout + differ.stderr
    report = json.loads(differ.stdout)
    assert sorted(item["id"] for item in report["missing"]["ids"]) == sorted(deleted)
    assert report["missing"]["count"] == 3 and report["extra"]["count"] == 0 and report["order"]["count"] == 0
    assert (report["from"]["messages"], report["to"]["messages"]) == (300, 297)

    text = _verify(tmp_path, "--from", nats_url, "--to", redis_url)
    assert text.returncode == 1
    assert "extra on the destination: 3" in text.stdout
    assert all(i in text.stdout for i in deleted)

    _, consumers = asyncio.run(_stream_state(nats_server.url, stream))
    assert not [c for c in consumers if c.startswith(("verify-", "read-all-"))], consumers


async def _send_created(url: str, created_at: datetime, count: int) -> list[Message]:
    messages = [envelope.build(subject="agent.message.dev-1", sender_id="pm", recipient_id="dev-1",
                               content=f"old {i}", task_execution_id=uuid.uuid4(), created_at=created_at)
                for i in range(count)]
    async with Bus.from_url(url) as bus:
        await bus.publish_many(messages)
    return messages


async def _to_kafka(url: str, messages: list[Message]) -> None:
    async with Bus.from_url(url) as bus:
        await bus.publish_many(messages)


def test_redis_to_kafka_lists_skipped_added_and_reordered(
    redis_url: str, tansu: TansuServer, tmp_path: Path
) -> None:
    kafka_url = f"{tansu.url}?partitions=4&idempotence=off&topic=v{uuid.uuid4().hex[:10]}"
    executions = [uuid.uuid4() for _ in range(4)]
    sent = asyncio.run(_send(redis_url, 200, executions))
    asyncio.run(_to_kafka(kafka_url, sent))
    same = _verify(tmp_path, "--from", redis_url, "--to", kafka_url, "--json")
    assert same.returncode == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["to"]["messages"] == 200

    # a second pair of topics: 3 skipped (one without execution), 2 added, 2 of one execution swapped
    kafka_url = f"{tansu.url}?partitions=4&idempotence=off&topic=v{uuid.uuid4().hex[:10]}"
    skipped = [sent[7], sent[10], sent[123]]
    added = asyncio.run(_send(kafka_url, 2, executions))
    first, second = [i for i, m in enumerate(sent) if m.task_execution_id == executions[1]][3:5]
    copy = list(sent)
    copy[first], copy[second] = copy[second], copy[first]
    asyncio.run(_to_kafka(kafka_url, [m for m in copy if m not in skipped]))
    differ = _verify(tmp_path, "--from", redis_url, "--to", kafka_url, "--json")
    assert differ.returncode == 1, differ.stdout + differ.stderr
    report: dict[str, Any] = json.loads(differ.stdout)
    assert {(i["execution"], i["id"]) for i in report["missing"]["ids"]} == {
        (str(m.task_execution_id) if m.task_execution_id else "none", str(m.id)) for m in skipped
    }
    assert {i["id"] for i in report["extra"]["ids"]} == {str(m.id) for m in added}
    assert report["order"]["executions"] == [{"execution": str(executions[1]), "first_difference": 3}]

    # created_at decides --since, not when the broker stored the message: 3 sent now but created 2 h ago
    old = asyncio.run(_send_created(redis_url, datetime.now(UTC) - timedelta(hours=2), 3))  # on Redis only
    everything = json.loads(_verify(tmp_path, "--from", redis_url, "--to", kafka_url, "--json").stdout)
    assert everything["missing"]["count"] == len(skipped) + len(old)
    recent = json.loads(_verify(tmp_path, "--from", redis_url, "--to", kafka_url, "--since", "1h", "--json").stdout)
    assert {i["id"] for i in recent["missing"]["ids"]} == {str(m.id) for m in skipped}


async def _produce_while(url: str, verify: list[str], env: dict[str, str]) -> tuple[set[str], int, str]:
    """Send to ``url`` without pause while ``squadbus verify`` runs; (ids sent before it, its exit code, stdout)."""
    async with Bus.from_url(url) as bus:
        execution = uuid.uuid4()
        before = [await bus.send("pm", "dev-1", f"m{i}", task_execution_id=execution) for i in range(500)]
        stop_sending = asyncio.Event()

        async def produce() -> None:
            while not stop_sending.is_set():
                await bus.send("pm", "dev-1", "more", task_execution_id=execution)

        producer = asyncio.create_task(produce())
        try:
            proc = await asyncio.create_subprocess_exec(*verify, env=env, stdout=asyncio.subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            stop_sending.set()
            await producer
        assert proc.returncode is not None
        return {str(m.id) for m in before}, proc.returncode, out.decode()


def test_verify_ends_while_producers_keep_writing(redis_url: str, nats_server: NatsServer, tmp_path: Path) -> None:
    """Each side is read up to where it ended when verify looked; what was sent before verify started
    is on both, in order; only messages written during the run may be on one side only."""
    stream = f"v{uuid.uuid4().hex[:10]}"
    dual = f"dual://{redis_url}|{nats_server.url}?stream={stream}"
    command = [sys.executable, "-m", "squadbus", "verify", "--from", redis_url, "--to",
               f"{nats_server.url}?stream={stream}", "--json", "--show", "1000000"]
    before, code, out = asyncio.run(_produce_while(dual, command, clean_env(tmp_path / "data")))
    assert code in (0, 1), out
    report = json.loads(out)
    assert report["from"]["messages"] >= len(before) and report["to"]["messages"] >= len(before)
    one_sided = {i["id"] for i in report["missing"]["ids"] + report["extra"]["ids"]}
    assert not one_sided & before
    assert report["order"]["count"] == 0
