"""The analytics, audit-logger and sse-broadcaster workers, and ``squadbus worker`` / ``serve`` as processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from squadbus.cli.main import main
from squadbus.cli.serve import redact
from squadbus.core import envelope
from squadbus.core.bus import Bus
from squadbus.service.open_mode import is_loopback
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until
from squadbus.workers.analytics import Analytics
from squadbus.workers.audit import AuditFile, AuditLogger
from squadbus.workers.registry import build_worker, worker_names
from squadbus.workers.sse_broadcaster import SseBroadcaster


async def test_registry_knows_every_worker() -> None:
    assert worker_names() == ["analytics", "audit-logger", "db-writer", "dead-letter-keeper", "sse-broadcaster"]


async def test_the_dead_letter_keeper_runs_from_the_registry(tmp_path: Path) -> None:
    """``squadbus worker dead-letter-keeper`` builds it (a db-writer in its own process keeps no dead letters)."""
    from squadbus.core import subjects
    from squadbus.core.settings import Settings
    from squadbus.store import open_store
    from squadbus.store.dead_letters import DeadLetter, DeadLetterQuery, KeepsDeadLetters

    async with Bus.from_url("memory://") as bus, open_store(f"sqlite+aiosqlite:///{tmp_path / 'h.db'}") as store:
        assert isinstance(store, KeepsDeadLetters)
        keeper = build_worker("dead-letter-keeper", bus, store, Settings())
        await keeper.start()
        plain = envelope.build(subject="agent.message.ops", sender_id="pm", content="x")
        dead = await bus.publish(plain.evolve(id=envelope.new_id(), subject=subjects.dead_letter("billing")))
        items: list[DeadLetter] = []
        for _ in range(250):
            items = (await store.list_dead_letters(DeadLetterQuery(group="billing"))).items
            if items:
                break
            await asyncio.sleep(0.02)
        await keeper.stop()
    assert [item.message.id for item in items] == [dead.id]


async def test_analytics_counts_and_times_replies() -> None:
    execution = uuid.uuid4()
    async with Bus.from_url("memory://") as bus:
        analytics = Analytics(bus)
        await analytics.start()

        async def responder() -> None:
            async with bus.inbox("dev-1", broadcasts=False) as inbox:
                delivery = await inbox.get(timeout=5)
                await bus.reply(delivery.message, "dev-1", "pong")
                await delivery.ack()

        task = asyncio.create_task(responder())
        await asyncio.sleep(0.05)
        await bus.request("pm", "dev-1", "ping", timeout=5, task_execution_id=execution)
        await task
        q = await bus.send("pm", "qa", "is it green?", "question", task_execution_id=execution)
        await bus.send("qa", "pm", "see metadata", "answer", metadata={"in_reply_to": str(q.id)})
        await bus.send("pm", "dev-2", "why?", "question", task_execution_id=execution)
        await bus.send("dev-2", "pm", "because", "answer", task_execution_id=execution)
        await bus.broadcast("pm", "stand-up")
        for _ in range(100):
            if analytics.figures.messages == 7:
                break
            await asyncio.sleep(0.02)
        await analytics.stop()
    figures = analytics.figures
    assert figures.messages == 7
    assert figures.by_type == {"request": 1, "reply": 1, "question": 2, "answer": 2, "broadcast": 1}
    assert figures.response_time.count == 3
    assert figures.agents["pm"].sent == 4 and figures.agents["pm"].received == 3
    assert set(figures.agents) == {"pm", "dev-1", "qa", "dev-2"}


def test_analytics_bounds_are_counted_not_silent() -> None:
    from squadbus.core import envelope

    analytics = Analytics.__new__(Analytics)
    Analytics.__init__(analytics, bus=None, max_agents=2, max_open_questions=1)  # type: ignore[arg-type]
    for sender in ("a", "b", "c"):
        analytics.record(envelope.build(subject="agent.message.z", sender_id=sender, recipient_id="z",
                                        content="?", message_type="question"))
    assert len(analytics.figures.agents) == 2
    assert analytics.figures.agents_evicted == 2
    assert analytics.figures.questions_evicted >= 2


async def test_audit_logger_appends_json_lines_and_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "log.jsonl"
    async with Bus.from_url("memory://") as bus:
        audit = AuditLogger(bus, path=path, max_bytes=2048, fsync=False, max_wait=0.01)
        await audit.start()
        sent = [await bus.send("pm", "dev-1", f"line {i} " + "x" * 100) for i in range(40)]
        for _ in range(200):
            if audit.written == 40:
                break
            await asyncio.sleep(0.02)
        await audit.stop()
        await audit.stop()  # idempotent
    files = sorted(path.parent.iterdir())
    assert len(files) > 2 and audit.file.rotations == len(files) - 1
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["message"]["id"] for r in records) == sorted(str(m.id) for m in sent)
    assert all(f.stat().st_size <= 2048 for f in files)


def test_audit_file_keeps_max_files(tmp_path: Path) -> None:
    audit = AuditFile(tmp_path / "a.jsonl", max_bytes=1024, max_files=2, fsync=False)
    for _ in range(10):
        audit.append([b"y" * 600 + b"\n"])
    assert len(list(tmp_path.iterdir())) == 3  # current + 2 rotated


async def test_sse_broadcaster_wakes_per_execution() -> None:
    execution = uuid.uuid4()
    woken: list[tuple[uuid.UUID, tuple[uuid.UUID, ...]]] = []
    async with Bus.from_url("memory://") as bus:
        broadcaster = SseBroadcaster(bus, lambda e, ids: woken.append((e, tuple(ids))))
        await broadcaster.start()
        m = await bus.send("pm", "dev-1", "x", task_execution_id=execution)
        await bus.send("pm", "dev-1", "no execution")
        for _ in range(100):
            if broadcaster.seen == 2:
                break
            await asyncio.sleep(0.01)
        await broadcaster.stop()
    assert woken == [(execution, (m.id,))]


async def test_standalone_workers_build_from_registry(tmp_path: Path) -> None:
    from squadbus.core.settings import Settings
    from squadbus.store.base import open_store

    settings = Settings(store_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    async with Bus.from_url("memory://") as bus:
        for name in ("analytics", "sse-broadcaster"):
            worker = build_worker(name, bus, open_store(settings.store_url), settings)
            assert worker.name == name
            await worker.start()
            await worker.stop()


def test_worker_process_stops_gracefully_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "SQUADBUS_URL": "memory://"}
    log = tmp_path / "worker.log"
    proc = spawn([sys.executable, "-m", "squadbus", "worker", "analytics"], log, env=env)
    try:
        wait_until(lambda: "running on memory" in log.read_text(), 30, "squadbus worker", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            stop(proc)
    assert '"worker": "analytics"' in log.read_text()
    assert "stopped" in log.read_text()


def test_serve_refuses_open_mode_off_loopback() -> None:
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert "refusing to serve without tokens on 0.0.0.0" in result.output


def test_serve_helpers() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")
    assert redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("memory://") == "memory://"


@pytest.mark.slow
def test_serve_process_runs_everything_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SQUADBUS_URL": "memory://"}
    env.pop("SQUADBUS_TOKENS_FILE", None)
    log = tmp_path / "serve.log"
    store = f"sqlite+aiosqlite:///{tmp_path / 'serve.db'}"
    argv = [sys.executable, "-m", "squadbus", "serve", "--port", str(port), "--store", store,
            "--audit-path", str(tmp_path / "audit.jsonl"), "--log-level", "warning",
            "--max-connections", "50", "--header-timeout", "1"]
    proc = spawn(argv, log, env=env)
    try:
        wait_until(lambda: port_open(port), 30, "squadbus serve", proc)
        base = f"http://127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers that never end
            assert slow.recv(64).startswith(b"HTTP/1.1 408 ")
        r = httpx.post(base + "/v1/messages", json={"sender_id": "pm", "content": "hi"})
        assert r.status_code == 201
        assert httpx.get(base + "/readyz").status_code == 200
        wait_until((tmp_path / "audit.jsonl").exists, 10, "audit log")
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (lifespan: workers stop and ack), then re-raises SIGTERM
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            stop(proc)
    out = log.read_text()
    assert f"listening on http://127.0.0.1:{port}" in out
    assert "backend: memory://" in out and "store:   sqlite+aiosqlite" in out
    assert "auth:    OPEN" in out
    assert "db-writer, sse-broadcaster, analytics, audit-logger" in out
    assert "limits:  50 connections, headers within 1 s, bodies within 30 s" in out


async def test_analytics_counts_types_past_its_bound_as_other() -> None:
    async with Bus.from_url("memory://") as bus:
        analytics = Analytics(bus, max_types=3)
        for i in range(10):
            analytics.record(envelope.build(subject="agent.message.dev-1", sender_id="pm", recipient_id="dev-1",
                                            content="x", message_type=f"t{i}"))
    assert dict(analytics.figures.by_type) == {"t0": 1, "t1": 1, "t2": 1, "other": 7}
