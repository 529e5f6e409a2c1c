"""``squadbus simulate`` over two host processes on a real Redis: each message reaches only its agent's host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from squadbus.benchmarks.simulate_squad import KINDS, Squad, host_of
from squadbus.cli.simulate import simulate

pytestmark = pytest.mark.redis


def test_two_host_processes_each_get_only_their_agents_messages(redis_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(simulate, [
        "--url", redis_url, "--agents", "40", "--msgs-per-hour", "60", "--speedup", "300", "--duration", "3",
        "--processes", "2", "--p99-target", "60000", "--json", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["held"] is True, run["reasons"]
    assert run["open"]["opened"] == 40
    # exactly once, to the right agent, on the host that hosts it
    assert run["lost"] == 0 and run["duplicated"] == 0 and run["misrouted"] == 0
    assert run["delivered"]["total"] == run["delivered"]["expected"]
    for kind in KINDS:
        assert run["delivered"]["by_kind"][kind] > 0, kind
    hosts = run["processes_figures"]["hosts"]
    squad = Squad(40)
    assert [h["agents"] for h in hosts] == [len(squad.hosted_by(i, 2)) for i in (0, 1)]
    assert {host_of(a.id, 2) for a in squad.agents} == {0, 1}
    # no copies: what the hosts counted adds up to the deliveries the run expected, once each
    assert sum(h["delivered"] for h in hosts) == run["delivered"]["total"]
    assert all(h["delivered"] > 0 for h in hosts)
    assert run["broker"]["redis_client_connections"] > 0
    assert run["store"]["lag_at_end"] == 0
    # both hosts exited (and were stopped by PID)
    for h in hosts:
        assert "close_error" not in h or not h["close_error"]
    for pid in _host_pids(hosts):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _host_pids(hosts: list[dict[str, object]]) -> list[int]:
    return [int(str(h["pid"])) for h in hosts if "pid" in h]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
