"""Which squad agents are A2A-reachable: registration messages, read back from the history store.

An agent declares itself with :func:`declare`: one message from the agent to
:data:`EDGE_ID` with ``message_type`` :data:`REGISTER_TYPE` and a JSON body
(``name``, ``description``, ``skills``, ``reachable``). The db-writer stores
it like any message, so the registry survives restarts and every replica
sharing the store sees it; the latest registration of an agent wins and
:func:`withdraw` (``reachable: false``) takes the agent off the cards. Over
HTTP the same message is ``POST /v1/messages`` with that type and body, which
an agent token may only send for itself.

:class:`AgentRegistry` reads the registrations from the store on each call
(one indexed query per card or send): nothing is cached, so a registration is
visible as soon as it is stored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.store.base import HistoryQuery, HistoryStore

EDGE_ID = "a2a"
"""The agent id of the A2A edge: registrations are addressed to it (nobody needs to read them from the bus)."""

REGISTER_TYPE = "a2a.register"
"""The ``message_type`` of a registration."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Skill:
    """One skill on an agent's card (A2A ``AgentSkill``): ``id`` unique per agent, a name and a description."""

    id: str
    name: str
    description: str
    tags: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The skill as stored in a registration."""
        return {"id": self.id, "name": self.name, "description": self.description,
                "tags": list(self.tags), "examples": list(self.examples)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Skill:
        """The skill of a stored registration (KeyError/TypeError on a malformed one)."""
        return cls(id=str(raw["id"]), name=str(raw.get("name") or raw["id"]),
                   description=str(raw.get("description") or ""),
                   tags=tuple(str(t) for t in raw.get("tags") or ()),
                   examples=tuple(str(e) for e in raw.get("examples") or ()))


@dataclass(frozen=True, kw_only=True, slots=True)
class AgentEntry:
    """An A2A-reachable agent as its latest registration declares it."""

    agent_id: str
    name: str
    description: str
    skills: tuple[Skill, ...] = ()
    reachable: bool = True
    registered_at: str = field(default="", compare=False)


def registration_body(*, name: str, description: str, skills: Sequence[Skill], reachable: bool = True) -> str:
    """The content of a registration message (JSON)."""
    return json.dumps({"name": name, "description": description, "skills": [s.to_json() for s in skills],
                       "reachable": reachable})


async def declare(
    bus: Bus, agent_id: str, *, description: str, skills: Sequence[Skill] = (), name: str | None = None
) -> Message:
    """Make ``agent_id`` A2A-reachable: its card lists ``description`` and ``skills`` (latest declaration wins).

    Publishes one registration message from the agent to :data:`EDGE_ID`;
    the edge sees it once the db-writer has stored it (milliseconds).
    """
    body = registration_body(name=name or agent_id, description=description, skills=skills)
    return await bus.send(agent_id, EDGE_ID, body, REGISTER_TYPE)


async def withdraw(bus: Bus, agent_id: str) -> Message:
    """Take ``agent_id`` off the A2A cards (its tasks stay readable)."""
    body = registration_body(name=agent_id, description="", skills=(), reachable=False)
    return await bus.send(agent_id, EDGE_ID, body, REGISTER_TYPE)


def parse_registration(message: Message) -> AgentEntry | None:
    """The entry a stored registration declares, or None when its body is malformed."""
    try:
        raw = json.loads(message.content)
        skills = tuple(Skill.from_json(s) for s in raw.get("skills") or ())
        return AgentEntry(agent_id=message.sender_id, name=str(raw.get("name") or message.sender_id),
                          description=str(raw.get("description") or ""), skills=skills,
                          reachable=bool(raw.get("reachable", True)),
                          registered_at=message.created_at.isoformat())
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class AgentRegistry:
    """The A2A-reachable agents, read from the registrations in ``store``."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    async def _registrations(self, agent_id: str | None) -> dict[str, AgentEntry]:
        latest: dict[str, AgentEntry] = {}
        cursor: str | None = None
        while True:
            page = await self.store.query(HistoryQuery(message_type=REGISTER_TYPE, agent_id=agent_id,
                                                       cursor=cursor, limit=1000))
            for row in page.items:
                if row.message.recipient_id != EDGE_ID:
                    continue
                entry = parse_registration(row.message)
                if entry is not None:
                    latest[entry.agent_id] = entry  # stored order: the latest wins
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        return {k: v for k, v in latest.items() if v.reachable}

    async def get(self, agent_id: str) -> AgentEntry | None:
        """The reachable agent ``agent_id``, or None."""
        return (await self._registrations(agent_id)).get(agent_id)

    async def all(self) -> list[AgentEntry]:
        """Every reachable agent, by id."""
        found = await self._registrations(None)
        return [found[k] for k in sorted(found)]
