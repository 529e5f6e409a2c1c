"""How a deployment places agents on Kafka hosts: by inbox partition (docs/backends/kafka.md).

An agent's direct messages are in partition ``murmur2(agent) % partitions`` of
the inbox topic, read only by the Bus the inbox group gave it. Host ``i`` of
``hosts`` connects with ``inbox_hosts=<hosts>&inbox_host=<i>`` (:func:`host_url`):
the group gives it the partitions ``p % hosts == i``, so it opens the agents
:func:`host_of` places on it. A running Bus tells what it owns now with
``Bus.inbox_placement()``.
"""

from __future__ import annotations

from functools import lru_cache

from squadbus.backends.kafka.partitioner import partition_for
from squadbus.backends.kafka.settings import KafkaSettings
from squadbus.core.placement import host_url

__all__ = ["host_of", "host_url"]  # host_url: the one in core, for callers that place by this backend


def host_of(url: str, agent_id: str, hosts: int) -> int:
    """The host (0-based, among ``hosts``) that serves ``agent_id`` on the ``kafka://`` ``url``, assuming
    its inbox topic has the URL's ``partitions`` (true when squadbus created it)."""
    return partition_for(agent_id.encode(), _partition_ids(url)) % hosts


@lru_cache(maxsize=16)
def _partition_ids(url: str) -> list[int]:
    return list(range(KafkaSettings.from_url(url).partitions))
