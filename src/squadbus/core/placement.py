"""Which host process may serve which agent's inbox: an optional backend ability (issue 15).

On memory, Redis and NATS any process can open any agent's inbox (an agent's
messages are found by its own key or subject), so a deployment places agents
as it likes. On Kafka and RabbitMQ an agent's direct messages live in one inbox
partition (of the inbox topic, or one of the inbox partition queues) and the
partition is the unit: only the Bus that reads it serves its agents, so a host
opens the agents of the partitions it owns. Host ``i`` of ``hosts`` connects
with :func:`host_url`. A backend
with that constraint implements :class:`PlacesInboxes`;
:meth:`Bus.inbox_placement <squadbus.core.bus.Bus.inbox_placement>` returns
its :class:`InboxPlacement`, or None where any placement works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class InboxPlacement:
    """Agents placed by partition: ``partition_of(agent)`` among ``partitions``; ``owned`` are this Bus's now.

    ``owned`` is a snapshot: a rebalance (a host joining or leaving) moves
    partitions, so a host runner asks again after one.
    """

    partitions: int
    owned: frozenset[int]
    partition_of: Callable[[str], int]

    def owns(self, agent_id: str) -> bool:
        """True when this Bus reads ``agent_id``'s partition now."""
        return self.partition_of(agent_id) in self.owned

    def owned_agents(self, agents: Iterable[str]) -> list[str]:
        """The agents of ``agents`` this Bus serves now, in the order given."""
        return [agent for agent in agents if self.owns(agent)]


@runtime_checkable
class PlacesInboxes(Protocol):
    """A backend whose inboxes are served only by the Bus owning the agent's partition."""

    async def inbox_placement(self) -> InboxPlacement:
        """The placement now; joins the inbox group first if this Bus has not (bounded by the
        backend's join timeout: a Bus that was not assigned anything then owns no partition).
        Raises a :class:`~squadbus.core.errors.BackendError` when the broker cannot be reached."""
        ...


def host_url(url: str, host: int, hosts: int) -> str:
    """``url`` with host ``host``'s slot among ``hosts`` (``inbox_hosts``, ``inbox_host``), for the
    backends that place inboxes by partition (Kafka, RabbitMQ): it reads the partitions ``p % hosts == host``."""
    separator = "&" if urlsplit(url).query else "?"
    return f"{url}{separator}inbox_hosts={hosts}&inbox_host={host}"
