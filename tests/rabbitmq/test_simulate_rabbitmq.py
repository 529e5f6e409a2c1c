"""``squadbus simulate`` over two host processes on a real RabbitMQ node: each host reads the inbox
partitions of the agents placed on it, so every message reaches its agent once, on its host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from squadbus.backends.rabbitmq.placement import host_of as rabbitmq_host_of
from squadbus.benchmarks.simulate_squad import KINDS, Squad, host_of
from squadbus.cli.simulate import simulate

pytestmark = pytest.mark.rabbitmq


def test_two_host_processes_are_placed_by_inbox_partition(rabbitmq_url: str, tmp_path: Path) -> None:
    # 3 hosts do not divide the 16 partitions: placed by crc32 % 3 two hosts would share partitions
    # (one of them a standby whose agents wait); placed by partition each reads its own.
    url, processes = rabbitmq_url, 3
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(simulate, [
        "--url", url, "--agents", "30", "--msgs-per-hour", "60", "--speedup", "300", "--duration", "3",
        "--processes", str(processes), "--p99-target", "60000", "--json", str(out),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    [run] = json.loads(out.read_text())["runs"]
    assert run["held"] is True, run["reasons"]
    assert run["open"]["opened"] == 30
    assert run["lost"] == 0 and run["duplicated"] == 0 and run["misrouted"] == 0
    assert run["delivered"]["total"] == run["delivered"]["expected"]
    for kind in KINDS:
        assert run["delivered"]["by_kind"][kind] > 0, kind
    squad = Squad(30)
    assert all(host_of(a.id, processes, url) == rabbitmq_host_of(url, a.id, processes) for a in squad.agents)
    hosts = run["processes_figures"]["hosts"]
    assert [h["agents"] for h in hosts] == [len(squad.hosted_by(i, processes, url)) for i in range(processes)]
    assert sum(h["delivered"] for h in hosts) == run["delivered"]["total"]
    # replies too are in the store (Bus.reply logs those sent by direct reply-to)
    assert run["sent"]["by_kind"]["reply"] > 0
    assert run["store"]["lag_at_end"] == 0 and run["store"]["rows"] == run["store"]["sent_persisted"]
