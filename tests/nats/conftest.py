"""Fixtures: a private JetStream server and a 3-node cluster, started once per session, stopped by PID."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from squadbus.testing.servers.nats import NatsCluster, NatsServer


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server with JetStream (fsync always) in a temp dir; fails if the binary is missing."""
    with NatsServer(tmp_path_factory.mktemp("nats-single")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three routed JetStream nodes on loopback; tests that kill a node restart it."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    with cluster:
        yield cluster
