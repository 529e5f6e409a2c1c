"""Agent cards: the squad's at ``/.well-known/agent-card.json`` and one per reachable agent.

* squad card: a JSON-RPC interface (``/a2a/jsonrpc``) and an HTTP+JSON one
  (``/a2a/rest``) at which GetTask, ListTasks, CancelTask and SubscribeToTask
  work for any task of the squad
  (SendMessage there names its agent in ``metadata["squadbus.agent_id"]``);
  its skills are every agent's, ids prefixed ``<agent_id>/``; the extension
  :data:`AGENTS_EXTENSION` lists each agent's card URL;
* agent card: ``/a2a/agents/<agent_id>/.well-known/agent-card.json``, whose
  interfaces ``/a2a/agents/<agent_id>/jsonrpc`` and ``…/rest`` send to that agent.

Both declare protocol 1.0, streaming, push notifications, the :data:`RESUME_EXTENSION` (SSE event
ids and ``Last-Event-ID``) and, when the service has tokens, the HTTP bearer
scheme of its tokens file.
"""

from __future__ import annotations

from typing import Any

from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentExtension,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_0_3, PROTOCOL_VERSION_1_0, TransportProtocol
from google.protobuf.struct_pb2 import Struct

from squadbus import __version__
from squadbus.service.a2a.registry import AgentEntry

RESUME_EXTENSION = "https://squadbus.dev/a2a/ext/resumable-streams/v1"
"""Streams are replayed from the history store: every SSE event has ``id: <seq>`` (also ``metadata["squadbus.seq"]``)
and a reconnect with ``Last-Event-ID`` (SendStreamingMessage or SubscribeToTask) resumes after it, across restarts."""
AGENTS_EXTENSION = "https://squadbus.dev/a2a/ext/squad-agents/v1"
"""The squad card's list of agents: ``params.agents`` maps each agent id to its card URL."""
BEARER = "bearer"
SQUAD_RPC = "/a2a/jsonrpc"
SQUAD_REST = "/a2a/rest"
"""The base of the squad's HTTP+JSON interface (``/a2a/rest/tasks/{id}``, …)."""
AGENT_REST = "/a2a/agents/{agent_id}/rest"


def agent_base(base_url: str, agent_id: str) -> str:
    """The base URL of one agent (its card is under ``/.well-known/`` of it)."""
    return f"{base_url}/a2a/agents/{agent_id}"


def _common(card: AgentCard, base: str, *, secured: bool, extensions: list[AgentExtension]) -> AgentCard:
    """Interfaces ``<base>/jsonrpc`` (JSON-RPC, the SDK client's default), ``<base>/rest`` (HTTP+JSON), and the
    JSON-RPC one again as protocol 0.3 (:mod:`.compat`), which the SDK turns into the card's 0.3 fields
    (``url``, ``preferredTransport``, ``protocolVersion``) for 0.3 clients; 1.0 clients pick 1.0."""
    card.version = __version__
    card.provider.CopyFrom(AgentProvider(organization="squadbus", url="https://squadbus.dev"))
    for path, binding, version in (("/jsonrpc", TransportProtocol.JSONRPC, PROTOCOL_VERSION_1_0),
                                   ("/rest", TransportProtocol.HTTP_JSON, PROTOCOL_VERSION_1_0),
                                   ("/jsonrpc", TransportProtocol.JSONRPC, PROTOCOL_VERSION_0_3)):
        card.supported_interfaces.append(AgentInterface(url=base + path, protocol_binding=binding,
                                                        protocol_version=version))
    resume = AgentExtension(uri=RESUME_EXTENSION, required=False,
                            description="SSE event ids are history sequence numbers; reconnect with "
                                        "Last-Event-ID to resume with no gap, also after a server restart")
    card.capabilities.CopyFrom(AgentCapabilities(streaming=True, push_notifications=True,
                                                 extensions=[resume, *extensions]))
    card.default_input_modes.append("text/plain")
    card.default_output_modes.append("text/plain")
    if secured:
        card.security_schemes[BEARER].CopyFrom(SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer", description="A token of the service's tokens file (roles agent, viewer, admin)")))
        card.security_requirements.append(SecurityRequirement(schemes={BEARER: StringList()}))
    return card


def _skill(agent: AgentEntry, skill_id: str, name: str, description: str, tags: tuple[str, ...],
           examples: tuple[str, ...]) -> AgentSkill:
    return AgentSkill(id=skill_id, name=name, description=description or name,
                      tags=list(tags) or [agent.agent_id], examples=list(examples))


def agent_card(agent: AgentEntry, base_url: str, *, secured: bool) -> dict[str, Any]:
    """The card of one reachable agent, as JSON."""
    card = AgentCard(name=agent.name, description=agent.description or f"squad agent {agent.agent_id}")
    for s in agent.skills:
        card.skills.append(_skill(agent, s.id, s.name, s.description, s.tags, s.examples))
    if not agent.skills:
        card.skills.append(_skill(agent, "chat", agent.name, card.description, (), ()))
    _common(card, agent_base(base_url, agent.agent_id), secured=secured, extensions=[])
    return agent_card_to_dict(card)


def squad_card(agents: list[AgentEntry], base_url: str, *, name: str, secured: bool) -> dict[str, Any]:
    """The squad's card: every reachable agent's skills and card URL, the squad-wide JSON-RPC interface."""
    card = AgentCard(name=name, description=f"A squadbus squad of {len(agents)} A2A-reachable agents: "
                                           "tasks are executions kept in the squad's history")
    params = Struct()
    params.update({"agents": {a.agent_id: agent_base(base_url, a.agent_id) + "/.well-known/agent-card.json"
                              for a in agents}})
    listing = AgentExtension(uri=AGENTS_EXTENSION, required=False, params=params,
                             description="The squad's agents and their cards; SendMessage at the squad "
                                         "interface names its agent in metadata['squadbus.agent_id']")
    for a in agents:
        for s in a.skills:
            card.skills.append(_skill(a, f"{a.agent_id}/{s.id}", s.name, s.description, s.tags, s.examples))
        if not a.skills:
            card.skills.append(_skill(a, f"{a.agent_id}/chat", a.name, a.description, (), ()))
    if not agents:
        card.skills.append(AgentSkill(id="squad", name="squad", description="No agent is A2A-reachable yet",
                                      tags=["squad"]))
    _common(card, base_url + "/a2a", secured=secured, extensions=[listing])
    return agent_card_to_dict(card)
