"""``squadbus bench``: CPU and memory of client and broker beside every line.

Values are checked for presence and plausibility (positive, the right process),
never for speed. The broker lookup is also run against a made-up /proc tree.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from squadbus.benchmarks.resources import CpuReading, Meter, Process, Resources, broker_process, cpu_reading, rss_bytes
from squadbus.cli.bench import bench
from squadbus.testing.servers.process import free_port
from squadbus.testing.servers.redis import RedisServer


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(bench, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _usage_fields(usage: dict[str, Any]) -> None:
    assert usage["cpu_s"] > 0 and usage["cpu_pct"] > 0 and usage["cpu_us_per_msg"] > 0
    assert usage["rss_mib_peak"] >= usage["rss_mib_end"] > 0 and usage["rss_mib_start"] > 0
    assert usage["rss_mib_peak"] >= usage["rss_mib_start"]
    assert usage["reason"] is None


def test_memory_reports_the_client_and_says_why_the_broker_is_not_apart() -> None:
    code, stdout, stderr = _run("--url", "memory://", "--max", "--count", "300", "--senders", "4", "--json", "-")
    assert code == 0, stdout + stderr
    document = json.loads(stdout)
    assert document["broker_process"]["pid"] is None
    assert "memory://" in document["broker_process"]["reason"]
    [run] = document["runs"]
    for side in ("raw", "squadbus"):
        resources = run[side]["resources"]
        assert resources["messages"] == run[side]["received"] == 300
        assert resources["wall_s"] > 0
        client = resources["client"]
        _usage_fields(client)
        assert client["pid"] == os.getpid()
        broker = resources["broker"]
        assert broker["pid"] is None and broker["cpu_s"] is None and broker["rss_mib_peak"] is None
        assert "runs inside the client process" in broker["reason"]


@pytest.mark.redis
def test_a_local_redis_server_is_found_by_its_port_and_measured(redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    code, stdout, stderr = _run("--url", redis_server.url, "--max", "--count", "400", "--senders", "8")
    assert code == 0, stdout + stderr
    assert f"broker redis-server[{redis_server.proc.pid}]" in stdout and "of a core" in stdout

    code, stdout, stderr = _run("--url", redis_server.url, "--max", "--count", "400", "--senders", "8",
                                "--json", "-")
    assert code == 0, stdout + stderr
    document = json.loads(stdout)
    assert document["broker_process"]["pid"] == redis_server.proc.pid
    assert document["broker_process"]["name"] == "redis-server"
    [run] = document["runs"]
    for side in ("raw", "squadbus"):
        resources = run[side]["resources"]
        _usage_fields(resources["client"])
        _usage_fields(resources["broker"])
        assert resources["broker"]["pid"] == redis_server.proc.pid


@pytest.mark.redis
def test_an_explicit_broker_pid_is_used_and_a_missing_one_is_one_line(redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    pid = redis_server.proc.pid
    found = broker_process("redis://192.0.2.1:1/0", pid)  # the URL no longer matters
    assert found.pid == pid and found.found_by == "--broker-pid"
    assert cpu_reading(pid).ticks >= 0 and rss_bytes(pid) > 0

    code, stdout, stderr = _run("--url", "memory://", "--broker-pid", str(2**22 + 7), "--count", "10")
    assert code == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error: --broker-pid") and "no such process" in line


def test_remote_and_unserved_addresses_are_not_available_with_the_reason() -> None:
    remote = broker_process("nats://192.0.2.1:4222")  # TEST-NET-1: never an address of this machine
    assert remote.pid is None and remote.reason is not None and "remote broker" in remote.reason
    nobody = broker_process(f"redis://127.0.0.1:{free_port()}/0")
    assert nobody.pid is None and nobody.reason is not None and "no process on this machine listens" in nobody.reason


def _fake_proc(tmp_path: Path, *, tcp: str = "", tcp6: str = "") -> Path:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(header + tcp)
    (tmp_path / "net" / "tcp6").write_text(header + tcp6)
    for pid, name, inode in ((4321, "tansu", "777"), (4400, "tansu", "777"), (99, "other", "5")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(name + "\n")
        (tmp_path / str(pid) / "fd" / "3").symlink_to(f"socket:[{inode}]")
    return tmp_path


def test_the_listener_is_read_from_proc_net_tcp_and_its_owner_from_the_fds(tmp_path: Path) -> None:
    # 127.0.0.1:9092 listening (0A), owned by 4321 and its fork 4400; a connected socket on the same port is not
    row = "   0: 0100007F:2384 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 777 1\n"
    established = "   1: 0100007F:2384 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  0  0 5 1\n"
    proc = _fake_proc(tmp_path, tcp=row + established)
    assert broker_process("kafka://127.0.0.1:9092", proc=proc) == Process(4321, "tansu", "listens on 127.0.0.1:9092")
    assert broker_process("kafka://127.0.0.1:9093", proc=proc).pid is None


def test_an_ipv6_wildcard_listener_serves_the_loopback_url(tmp_path: Path) -> None:
    row = ("   0: 00000000000000000000000000000000:1092 00000000000000000000000000000000:0000 0A "
           "00000000:00000000 00:00000000 00000000  0  0 777 1\n")
    proc = _fake_proc(tmp_path, tcp6=row)
    found = broker_process("nats://bob:pw@127.0.0.1:4242,127.0.0.1:4243?profile=fast", proc=proc)
    assert found.pid == 4321 and found.name == "tansu"


def test_a_broker_that_exits_during_the_line_is_not_available_with_the_reason() -> None:
    child = subprocess.Popen(["sleep", "30"])
    meter = Meter(Process(child.pid, "sleep", "--broker-pid"), every=0.01)

    async def line() -> Resources:
        meter.start()
        await asyncio.sleep(0.03)
        child.kill()
        child.wait()
        await asyncio.sleep(0.03)
        return await meter.stop(10)

    try:
        resources = asyncio.run(line())
    finally:
        child.kill()
        child.wait()
    broker = resources.as_dict()["broker"]
    assert broker["pid"] == child.pid and broker["cpu_s"] is None and broker["rss_mib_peak"] is None
    assert f"process {child.pid} could not be read" in broker["reason"]
    assert resources.as_dict()["client"]["rss_mib_end"] > 0
    assert "n/a: process" in resources.line()


def test_cpu_between_readings_is_the_thread_sum_unless_threads_ended() -> None:
    start = CpuReading(threads=10.0, ticks=10.0)
    # the thread sum is exact (ns) and agrees with the ticks to a tick: it is taken
    assert CpuReading(threads=10.123456, ticks=10.12).since(start) == 10.123456 - 10.0
    # a thread with 2 s of CPU ended: the live-thread sum dropped, the ticks kept it
    assert CpuReading(threads=8.5, ticks=10.5).since(start) == 10.5 - 10.0
    assert CpuReading(threads=None, ticks=11.0).since(CpuReading(None, 10.0)) == 1.0


def test_a_cancelled_meter_has_stopped_sampling_when_cancel_returns() -> None:
    # loadgen cancels its meter when a line fails, then stops the side: the sampler must not run on behind it.
    meter = Meter(Process(None, reason="none"), every=0.01)

    async def line() -> list[str]:
        meter.start()
        await asyncio.sleep(0.03)
        await meter.cancel()
        await meter.cancel()  # idempotent
        return [t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(line()) == []
