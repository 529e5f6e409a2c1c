"""How a deployment places agents on RabbitMQ hosts: by inbox partition (docs/backends/rabbitmq.md).

An agent's direct messages wait in the inbox partition queue ``crc32(agent) % inbox_partitions``, read
by one Bus at a time (single active consumer). Host ``i`` of ``hosts`` connects with
``inbox_hosts=<hosts>&inbox_host=<i>`` (:func:`host_url`) and reads the partitions ``p % hosts == i``, so
it opens the agents :func:`host_of` places on it. ``Bus.inbox_placement()`` says the same of a running Bus.
"""

from __future__ import annotations

from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.backends.rabbitmq.topology import inbox_partition
from squadbus.core.placement import host_url

__all__ = ["host_of", "host_url"]  # host_url: the one in core, for callers that place by this backend


def host_of(url: str, agent_id: str, hosts: int) -> int:
    """The host (0-based, among ``hosts``) that serves ``agent_id`` on the ``amqp://`` ``url``."""
    return inbox_partition(agent_id, RabbitSettings.from_url(url).inbox_partitions) % hosts
