"""A subset of the conformance suite on a 3-node cluster with an R3 stream."""

from __future__ import annotations

import pytest

from squadbus.core.bus import Bus
from squadbus.testing.conformance import BusFactory, ConformanceSuite, Features
from squadbus.testing.servers.nats import NatsCluster

pytestmark = pytest.mark.nats

CLUSTER_SUBSET = frozenset({
    "test_publish_subscribe_keeps_payload_and_metadata",
    "test_redelivery_on_failure_counts_attempts",
    "test_dead_letter_after_max_deliver_with_reason",
    "test_each_group_gets_everything_members_split",
    "test_group_resumes_after_close",
    "test_request_reply_and_timeout",
    "test_duplicate_id_is_delivered_once_or_marked",
    "test_replay_of_an_execution",
})


def cluster_url(cluster: NatsCluster) -> str:
    return f"{cluster.url}?replicas=3"


class TestNatsClusterConformance(ConformanceSuite):
    features = Features(name="nats-cluster", persistent=True, dedupe=True, replay=True, timeout=30.0, scale=0.5)

    @pytest.fixture
    async def bus_factory(self, nats_cluster: NatsCluster) -> BusFactory:
        url = cluster_url(nats_cluster)

        async def make() -> Bus:
            return await Bus.from_url(url).start()

        return make


# Only the subset runs on the cluster; the single node runs everything.
for _name in dir(ConformanceSuite):
    if _name.startswith("test_") and _name not in CLUSTER_SUBSET:
        setattr(TestNatsClusterConformance, _name, None)


async def test_stream_is_replicated_on_three_nodes(nats_cluster: NatsCluster) -> None:
    async with Bus.from_url(cluster_url(nats_cluster)) as bus:
        await bus.send("pm", "dev-1", "hello cluster")
        info = await bus.backend.js.stream_info(bus.backend.settings.stream)  # type: ignore[attr-defined]
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader
        assert len(info.cluster.replicas or []) == 2
        leader = nats_cluster.stream_leader(bus.backend.settings.stream)  # type: ignore[attr-defined]
        assert leader is not None and leader.name == info.cluster.leader
