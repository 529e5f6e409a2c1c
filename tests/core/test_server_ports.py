"""Private test servers get distinct ports (a NATS cluster once routed to another node's HTTP port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from squadbus.testing.servers import nats as nats_servers
from squadbus.testing.servers.process import free_ports


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert all(1024 <= port <= 65535 for port in ports)


def test_nats_cluster_ports_are_distinct_even_when_the_kernel_repeats_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Separate one-port allocations can repeat a port; the cluster must not rely on them being distinct.
    monkeypatch.setattr(nats_servers, "free_port", lambda: 40000, raising=False)
    cluster = nats_servers.NatsCluster(tmp_path)
    ports = [p for node in cluster.nodes for p in (node.port, node.monitor_port, node.cluster_port)]
    assert len(ports) == 9
    assert len(set(ports)) == 9, ports
    assert all(node.routes == [n.cluster_port for n in cluster.nodes] for node in cluster.nodes)
