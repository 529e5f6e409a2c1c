"""How the inbox group shares the inbox topic's partitions: by host slot when the deployment says so.

A Bus started with ``inbox_hosts=N&inbox_host=i`` announces the slot ``i/N`` in
its group metadata; the group leader gives it the partitions ``p % N == i``,
so a deployment knows in advance which agents a host serves (``partition_of(agent)
% N``, :meth:`~squadbus.backends.kafka.inboxes.KafkaInboxHub.placement`). A
partition no member's slot claims (its host is down, or members announce no
slot) goes to the least loaded member, ties to the lowest member id: a host
that dies has its partitions served by the others until it is back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from squadbus.backends.kafka._driver import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata


def _slot(user_data: bytes | None) -> tuple[int, int] | None:
    try:
        host, hosts = (int(x) for x in bytes(user_data or b"").decode().split("/"))
    except ValueError:
        return None
    return (host, hosts) if 0 <= host < hosts else None


class InboxAssignor:
    """An aiokafka partition assignor (duck-typed like its classmethod assignors), one per consumer."""

    name = "squadbus-inbox"
    version = 0

    def __init__(self, host: int, hosts: int) -> None:
        self._user_data = f"{host}/{hosts}".encode() if hosts else b""

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        """This member's subscription and slot, sent with its JoinGroup."""
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), self._user_data)

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        """Nothing to remember: the hub learns its partitions from the rebalance listener."""

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Per topic: each partition to a member whose slot claims it, else to the least loaded member."""
        ids = sorted(members)
        slots = {member: _slot(members[member].user_data) for member in ids}
        given: dict[str, dict[str, list[int]]] = {member: {} for member in ids}
        for topic in sorted({t for m in members.values() for t in m.subscription}):
            readers = [m for m in ids if topic in members[m].subscription]
            load = dict.fromkeys(readers, 0)
            for partition in sorted(cluster.partitions_for_topic(topic) or ()):
                claim = [m for m in readers if (s := slots[m]) is not None and partition % s[1] == s[0]]
                chosen = min(claim or readers, key=lambda m: (load[m], m))
                load[chosen] += 1
                given[chosen].setdefault(topic, []).append(partition)
        return {
            member: ConsumerProtocolMemberAssignment(self.version, sorted(given[member].items()), b"")
            for member in ids
        }
