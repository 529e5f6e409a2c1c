"""``squadbus simulate`` on memory://, and its one-line refusals (the command function run with CliRunner).

These check what the command reports, never how fast: timings on a shared machine are not assertions.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from squadbus.benchmarks.loops import DEFAULT_LOOP, uvloop_installed
from squadbus.benchmarks.simulate import SimConfig
from squadbus.benchmarks.simulate_host import FLUSH_INTERVAL, HANDLER, Host, HostPlan
from squadbus.benchmarks.simulate_squad import KINDS, Squad
from squadbus.cli.main import main
from squadbus.cli.simulate import simulate
from squadbus.core.bus import Bus
from squadbus.core.errors import ConfigError
from squadbus.testing.servers.process import free_port


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(simulate, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_a_small_squad_on_memory_holds_and_every_kind_arrives(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    # --p99-target far off: held must not depend on how busy the shared machine is
    code, stdout, stderr = _run("--url", "memory://", "--agents", "200", "--msgs-per-hour", "30",
                                "--speedup", "240", "--duration", "3", "--p99-target", "60000", "--json", str(out))
    assert code == 0, stdout + stderr
    assert "verdict     custom (200 agents × 30 msgs/h): held" in stdout
    assert "opened 200 of 200 inboxes" in stderr  # the progress line
    [run] = json.loads(out.read_text())["runs"]
    assert run["held"] is True and run["reasons"] == []
    assert run["open"] == {"opened": 200, "of": 200, "seconds": run["open"]["seconds"], "errors": []}
    assert run["lost"] == 0 and run["duplicated"] == 0 and run["misrouted"] == 0
    assert run["sent"]["errors"] == 0 and run["sent"]["request_timeouts"] == 0
    for kind in KINDS:
        assert run["sent"]["by_kind"][kind] > 0, kind
        assert run["delivered"]["by_kind"][kind] > 0, kind
    assert run["delivered"]["total"] == run["delivered"]["expected"] > run["sent"]["total"]
    assert run["store"]["rows"] == run["store"]["sent_persisted"] == run["sent"]["total"]
    assert run["store"]["lag_at_end"] == 0
    for figure in ("p50", "p99", "p99.9", "max"):
        assert run["latency_ms"][figure] > 0
    assert run["latency_ms"]["count"] == run["delivered"]["total"]
    # What sets the tail: the latency of each route beside the overall one, and each broadcast's last copy.
    routes = run["latency_by_route_ms"]
    assert set(routes) == {"point_to_point", "domain", "squad"}
    assert sum(r["count"] for r in routes.values()) == run["latency_ms"]["count"]
    assert routes["squad"]["count"] == run["delivered"]["by_kind"]["squad"]
    assert routes["point_to_point"]["count"] == sum(run["delivered"]["by_kind"][k] for k in ("direct", "request",
                                                                                             "reply"))
    last = run["broadcast_last_copy_ms"]
    for kind in ("squad", "domain"):
        assert last[kind]["count"] == run["sent"]["by_kind"][kind]
        assert last[kind]["max"] >= last[kind]["p50"] > 0
    assert last["squad"]["max"] >= routes["squad"]["p50"]
    assert "by route    direct+request+reply p50" in stdout and "last copy   squad broadcast median" in stdout
    assert run["loop"] == DEFAULT_LOOP and run["receive"] == "iterator"
    assert "agents receive by iterator" in stdout
    assert run["rates"]["offered_msgs_per_s"] > 0 and run["rates"]["delivered_per_s"] > 0
    [host] = run["processes_figures"]["hosts"]
    assert host["rss_kib"] > 0 and host["gc_frozen"] is True and host["gc_frozen_objects"] > 0
    assert host["gc_max_pause_ms"] == max(host["gc_max_pause_ms_by_gen"]) and len(host["gc_max_pause_ms_by_gen"]) == 3
    assert host["gc_collections"] == sum(host["gc_collections_by_gen"]) and host["gc_tracked"] > 0
    assert len(host["gc_max_cpu_ms_by_gen"]) == 3
    assert "longest GC pause while sending" in stdout and "gen 0 / 1 / 2" in stdout


def test_json_on_stdout_instead_of_the_table() -> None:
    code, stdout, _ = _run("--url", "memory://", "--agents", "20", "--msgs-per-hour", "60", "--speedup", "600",
                           "--duration", "1", "--p99-target", "60000", "--loop", "asyncio", "--json", "-")
    assert code == 0
    document = json.loads(stdout)
    assert document["runs"][0]["agents"] == 20 and "environment" in document
    assert document["runs"][0]["loop"] == "asyncio"


def test_agents_with_a_handler_get_every_delivery_once() -> None:
    # --receive handler: each inbox calls a plain function inline, no task per agent; requests still answered.
    code, stdout, _ = _run("--url", "memory://", "--agents", "20", "--msgs-per-hour", "60", "--speedup", "1200",
                           "--duration", "2", "--p99-target", "60000", "--receive", "handler", "--json", "-")
    assert code == 0, stdout
    [run] = json.loads(stdout)["runs"]
    assert run["receive"] == "handler" and run["held"] is True
    assert run["delivered"]["total"] == run["delivered"]["expected"] > run["sent"]["total"] > 0
    assert run["lost"] == 0 and run["duplicated"] == 0 and run["misrouted"] == 0
    for kind in KINDS:
        assert run["delivered"]["by_kind"][kind] > 0, kind
    [host] = run["processes_figures"]["hosts"]
    assert host["handler_errors"] == 0 and host["stale"] == 0
    with pytest.raises(ConfigError, match="unknown --receive"):
        SimConfig(url="memory://", agents=10, msgs_per_hour=60, receive="callback")


def test_the_loop_is_asyncio_unless_uvloop_is_asked_for() -> None:
    assert SimConfig(url="memory://", agents=10, msgs_per_hour=60).loop == DEFAULT_LOOP == "asyncio"
    if not uvloop_installed():
        with pytest.raises(ConfigError, match="uvloop is not installed"):
            SimConfig(url="memory://", agents=10, msgs_per_hour=60, loop="uvloop")
    else:
        code, stdout, _ = _run("--url", "memory://", "--agents", "20", "--msgs-per-hour", "60", "--speedup", "600",
                               "--duration", "1", "--p99-target", "60000", "--loop", "uvloop", "--json", "-")
        assert code == 0
        [run] = json.loads(stdout)["runs"]
        assert run["loop"] == "uvloop" and run["lost"] == 0 and run["delivered"]["total"] > 0
    with pytest.raises(ConfigError, match="unknown event loop"):
        SimConfig(url="memory://", agents=10, msgs_per_hour=60, loop="trio")


def _one_line_usage_error(code: int, stderr: str, *words: str) -> None:
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("squadbus: error:")
    for word in words:
        assert word in line, line


def test_memory_with_several_processes_is_refused() -> None:
    code, stdout, stderr = _run("--url", "memory://", "--processes", "2", "--scenario", "1")
    assert stdout == ""
    _one_line_usage_error(code, stderr, "memory://", "--processes")


def test_a_bad_url_is_one_line() -> None:
    code, _, stderr = _run("--url", "nope://x", "--scenario", "1")
    _one_line_usage_error(code, stderr, "nope://x")


def test_a_down_broker_is_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, _, stderr = _run("--url", url, "--scenario", "1", "--duration", "1")
    _one_line_usage_error(code, stderr, "cannot reach", url)


def test_bad_options_are_one_line() -> None:
    for args in (["--scenario", "6"], ["--agents", "3", "--msgs-per-hour", "5"], ["--agents", "10"],
                 ["--scenario", "1", "--agents", "10", "--msgs-per-hour", "5"]):
        code, _, stderr = _run("--url", "memory://", *args)
        _one_line_usage_error(code, stderr)


def test_squadbus_simulate_is_a_command_of_the_cli() -> None:
    result = CliRunner().invoke(main, ["simulate", "--agents", "10", "--msgs-per-hour", "60", "--processes", "2"])
    assert result.exit_code == 2
    assert "memory://" in result.output


async def test_a_host_writes_its_deliveries_while_it_runs_not_only_when_it_stops() -> None:
    # The hot path keeps only the receipt; a task of the host writes the lines every FLUSH_INTERVAL, so the
    # receipts kept in memory stay bounded on a long run.
    bus = Bus.from_url("memory://")
    await bus.start()
    log = io.StringIO()
    plan = HostPlan(url="memory://", run_id="r1", agents=5, processes=1, host=0, rate_per_agent=0.0,
                    log_path="unused")
    host = Host(bus, plan, Squad(5), log)
    try:
        await host.open()
        message = await bus.send("pm-dev", "pm-sales", "hi", "task",
                                 metadata={"sim": "r1", "t": time.time(), "k": "direct"})
        async with asyncio.timeout(10):
            while "D " not in log.getvalue():
                await asyncio.sleep(FLUSH_INTERVAL / 3)
        [line] = [x for x in log.getvalue().splitlines() if x.startswith("D ")]
        _, message_id, agent, latency_us = line.split()
        assert (message_id, agent) == (str(message.id), "pm-sales") and int(latency_us) >= 1
        assert host.status()["delivered"] == 1
    finally:
        await host.stop()
        await bus.close()
        gc.unfreeze()
    assert sum(1 for x in log.getvalue().splitlines() if x.startswith("D ")) == 1  # not written again at stop


async def test_a_host_with_handlers_has_no_task_per_agent_and_still_answers_requests() -> None:
    bus = Bus.from_url("memory://")
    await bus.start()
    plan = HostPlan(url="memory://", run_id="r2", agents=50, processes=1, host=0, rate_per_agent=0.0,
                    log_path="unused", receive=HANDLER)
    host = Host(bus, plan, Squad(50), io.StringIO())
    before = len(asyncio.all_tasks())
    try:
        await host.open()
        assert host.status()["opened"] == 50
        assert len(asyncio.all_tasks()) - before < 25  # the Bus's and the host's own tasks, none per agent
        reply = await bus.request("pm-dev", "dev-5", "status?", "request", timeout=5,
                                  metadata={"sim": "r2", "t": time.time(), "k": "request"})
        assert reply.sender_id == "dev-5" and reply.content == "Done."
        await bus.broadcast("pm-dev", "news", "announcement", metadata={"sim": "r2", "t": time.time(), "k": "squad"})
        async with asyncio.timeout(10):
            while host.status()["delivered"] < 1 + 50:
                await asyncio.sleep(0.01)
        assert host.status()["handler_errors"] == 0
    finally:
        await host.stop()
        await bus.close()
        gc.unfreeze()
    assert host.status()["delivered"] == 1 + 50
