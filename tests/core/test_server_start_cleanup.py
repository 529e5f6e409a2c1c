"""A test server whose start fails for any reason, not only "not ready", is stopped: no broker left behind.

The wait for readiness can fail otherwise (an error in the check, a Ctrl-C during a test run); the
start used to stop the process only on ServerUnavailable, so it kept running after the test session."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from squadbus.testing.servers import kafka, nats, postgres, rabbitmq, redis


class _CheckFailed(RuntimeError):
    pass


def _failing_wait(*args: object, **kwargs: object) -> None:
    raise _CheckFailed("the readiness check itself failed")


def _servers() -> list[tuple[str, ModuleType, Any]]:
    return [
        ("tansu", kafka, kafka.TansuServer),
        ("redis", redis, lambda: redis.RedisServer("fast", directory=tempfile.mkdtemp(prefix="squadbus-redis-"))),
        ("nats", nats, lambda: nats.NatsServer(Path(tempfile.mkdtemp(prefix="squadbus-nats-")))),
        ("rabbitmq", rabbitmq, rabbitmq.RabbitServer),
    ]


@pytest.mark.parametrize(("name", "module", "make"), _servers(), ids=[s[0] for s in _servers()])
def test_a_start_that_fails_otherwise_stops_the_server(
    name: str, module: ModuleType, make: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    spawned: list[subprocess.Popen[bytes]] = []
    real_spawn = module.spawn

    def recording_spawn(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real_spawn(*args, **kwargs)
        spawned.append(proc)
        return proc

    monkeypatch.setattr(module, "spawn", recording_spawn)
    monkeypatch.setattr(module, "wait_until", _failing_wait)
    server = make()
    try:
        with pytest.raises(_CheckFailed):
            server.start()
        assert spawned, f"{name}: nothing was started"
        left = [proc.args for proc in spawned if proc.poll() is None]
        assert not left, f"{name}: left running after its start failed: {left}"
    finally:
        for proc in spawned:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.stop()
        if hasattr(server, "cleanup"):  # RabbitServer removes its own temporary directory
            server.cleanup()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie has ended: the postmaster is pg_ctl's child, not ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.postgres
def test_a_postgres_start_that_fails_otherwise_stops_the_postmaster(monkeypatch: pytest.MonkeyPatch) -> None:
    # pg_ctl starts the postmaster as a daemon (not spawn()): its PID is read from postmaster.pid once pg_ctl is done
    base = Path(tempfile.mkdtemp(prefix="squadbus-pg-"))
    server = postgres.PostgresServer(base)
    started: list[int] = []

    def failing_wait(*args: object, **kwargs: object) -> None:
        if (pid := server.pid()) is not None:
            started.append(pid)
        _failing_wait()

    monkeypatch.setattr(postgres, "wait_until", failing_wait)
    try:
        server.init()
        with pytest.raises(_CheckFailed):
            server.start()
        assert started, "postgres: nothing was started"
        left = [pid for pid in started if _alive(pid)]
        assert not left, f"postgres: postmaster {left} left running after its start failed"
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
