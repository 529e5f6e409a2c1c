"""How a deployment places agents on RabbitMQ hosts: by inbox partition (docs/backends/rabbitmq.md).

An agent's direct messages wait in the inbox partition queue ``crc32(agent) % inbox_partitions``, read
by one Bus at a time (single active consumer). Host ``i`` of ``hosts`` connects with
``inbox_hosts=<hosts>&inbox_host=<i>`` (:func:`host_url`) and reads the partitions ``p % hosts == i``, so
it opens the agents :func:`host_of` places on it. ``Bus.inbox_placement()`` says the same of a running Bus.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from squadbus.backends.rabbitmq.settings import RabbitSettings
from squadbus.backends.rabbitmq.topology import inbox_partition


def host_url(url: str, host: int, hosts: int) -> str:
    """``url`` with host ``host``'s slot among ``hosts`` (``inbox_hosts``, ``inbox_host``)."""
    separator = "&" if urlsplit(url).query else "?"
    return f"{url}{separator}inbox_hosts={hosts}&inbox_host={host}"


def host_of(url: str, agent_id: str, hosts: int) -> int:
    """The host (0-based, among ``hosts``) that serves ``agent_id`` on the ``amqp://`` ``url``."""
    return inbox_partition(agent_id, RabbitSettings.from_url(url).inbox_partitions) % hosts
