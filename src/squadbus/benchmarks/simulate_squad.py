"""The simulated squad of ``squadbus simulate``: its agents, where they live, and what they send.

Agents belong to five domains (:data:`DOMAINS`); the first five are the
domains' PMs (``pm-dev``, ``pm-marketing``, ...), the rest are
``<domain>-<n>`` spread round-robin over the domains. An agent lives on host
process ``crc32(agent_id) % processes`` (:func:`host_of`), the placement
``docs/design/inboxes.md`` names.

The mix, per message an agent sends (every agent sends at the same rate):

* a PM cycles through :data:`PM_CYCLE`: a squad broadcast, a broadcast to its
  domain, direct messages and requests to members of its domain (its first
  message is a squad broadcast, so a short run sees every kind);
* any other agent sends a direct message (80 %) or a request (20 %) to its
  PM (25 %), an agent of its own domain (55 %) or any agent (20 %);
* a request is answered at once by its recipient with a reply.

Broadcasts come from the five PMs only, so the deliveries they fan out to
grow with the squad (a squad broadcast reaches every agent, the sender too)
while the messages sent stay at the scenario's rate.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

DOMAINS = ("dev", "marketing", "admin", "sales", "support")

DIRECT = "direct"
REQUEST = "request"
REPLY = "reply"
DOMAIN = "domain"
SQUAD = "squad"
KINDS = (DIRECT, REQUEST, REPLY, DOMAIN, SQUAD)
"""Every kind of message the simulation sends (a reply is sent by a request's recipient)."""

SQUAD_TARGET = "*"
PM_CYCLE = (SQUAD, DOMAIN, DIRECT, REQUEST, DOMAIN, DIRECT, REQUEST, DIRECT)


@dataclass(frozen=True, slots=True)
class Agent:
    """One simulated agent."""

    id: str
    domain: str
    is_pm: bool


def places_by_partition(url: str) -> bool:
    """True for the backends whose hosts serve the agents of the inbox partitions they read (Kafka, RabbitMQ:
    ``squadbus.core.placement``); elsewhere any host can serve any agent."""
    return url.startswith(("kafka://", "amqp://", "amqps://"))


def host_of(agent_id: str, processes: int, url: str = "") -> int:
    """The host process (0-based) of ``agent_id`` among ``processes``: ``crc32(agent_id) % processes``,
    or on ``kafka://`` and ``amqp://`` the host of its inbox partition (the backends' ``placement``)."""
    if url.startswith("kafka://"):
        from squadbus.backends.kafka.placement import host_of as kafka_host_of

        return kafka_host_of(url, agent_id, processes)
    if url.startswith(("amqp://", "amqps://")):
        from squadbus.backends.rabbitmq.placement import host_of as rabbitmq_host_of

        return rabbitmq_host_of(url, agent_id, processes)
    return zlib.crc32(agent_id.encode()) % processes


class Squad:
    """``size`` agents (at least one PM per domain) and the message mix they follow (module docstring)."""

    def __init__(self, size: int) -> None:
        if size < len(DOMAINS):
            raise ValueError(f"a squad needs at least {len(DOMAINS)} agents (a PM per domain), got {size}")
        agents = [Agent(f"pm-{domain}", domain, True) for domain in DOMAINS]
        agents += [Agent(f"{DOMAINS[i % len(DOMAINS)]}-{i}", DOMAINS[i % len(DOMAINS)], False)
                   for i in range(len(DOMAINS), size)]
        self.agents: tuple[Agent, ...] = tuple(agents)
        self.by_id = {agent.id: agent for agent in agents}
        self.members = {domain: tuple(a for a in agents if a.domain == domain) for domain in DOMAINS}
        self.pms = {domain: self.by_id[f"pm-{domain}"] for domain in DOMAINS}
        self._pm_turns: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.agents)

    def hosted_by(self, host: int, processes: int, url: str = "") -> list[Agent]:
        """The agents placed on ``host`` (see :func:`host_of`)."""
        return [a for a in self.agents if host_of(a.id, processes, url) == host]

    def expected(self, kind: str, target: str) -> int:
        """How many inboxes a message of ``kind`` to ``target`` should reach."""
        if kind == SQUAD:
            return len(self.agents)
        if kind == DOMAIN:
            return len(self.members[target])
        return 1

    def reaches(self, kind: str, target: str, agent_id: str) -> bool:
        """True when a message of ``kind`` to ``target`` belongs in ``agent_id``'s inbox (or request)."""
        if kind == SQUAD:
            return agent_id in self.by_id
        if kind == DOMAIN:
            agent = self.by_id.get(agent_id)
            return agent is not None and agent.domain == target
        return agent_id == target

    def next_message(self, sender: Agent, rng: random.Random) -> tuple[str, str]:
        """``(kind, target)`` of the next message ``sender`` sends: an agent id, a domain or ``*``."""
        if sender.is_pm:
            turn = self._pm_turns.get(sender.id, 0)
            self._pm_turns[sender.id] = turn + 1
            kind = PM_CYCLE[turn % len(PM_CYCLE)]
            if kind == SQUAD:
                return kind, SQUAD_TARGET
            if kind == DOMAIN:
                return kind, sender.domain
            return kind, self._other(rng.choice(self.members[sender.domain]), sender, rng).id
        kind = REQUEST if rng.random() < 0.2 else DIRECT
        roll = rng.random()
        if roll < 0.25:
            recipient = self.pms[sender.domain]
        elif roll < 0.80:
            recipient = rng.choice(self.members[sender.domain])
        else:
            recipient = rng.choice(self.agents)
        return kind, self._other(recipient, sender, rng).id

    def _other(self, recipient: Agent, sender: Agent, rng: random.Random) -> Agent:
        """``recipient``, or another agent of the squad when it is the sender itself."""
        while recipient.id == sender.id:
            recipient = rng.choice(self.agents)
        return recipient
