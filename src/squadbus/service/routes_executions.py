"""``GET /v1/executions`` and ``GET /v1/agents``: the lists the dashboard browses.

Read access is the history's (:func:`~squadbus.service.auth.reader`): every
role, agent tokens included, lists every execution and agent, as they read
every execution's history (docs/security.md). One agent's messages are
``GET /v1/messages?agent_id=``. Both lists page with an opaque cursor; a
cursor that is not a ``next_cursor`` of the same list is a 422.

The agents are the store's, merged with those that have an inbox on the broker
(:mod:`squadbus.service.presence`, read for at most 2 s beside the store query):
an agent with an inbox and no retained message is added, in id order, to the
page whose id range holds it (code-point order, the SQLite order; on a
PostgreSQL collation other than ``C`` it may land on a neighbouring page), so a
page may hold more than ``limit`` items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from squadbus.core.inbox_source import InboxPresence
from squadbus.service.auth import Principal, reader
from squadbus.service.presence import InboxKind
from squadbus.service.routes_messages import ERRORS, IsoDateTime
from squadbus.service.schemas import (
    TOKEN_PATTERN,
    AgentList,
    AgentOut,
    ErrorOut,
    ExecutionList,
    ExecutionSummaryOut,
)
from squadbus.service.state import Service, ServiceDep
from squadbus.store._listing import decode_agent_cursor
from squadbus.store.base import MAX_LIST_LIMIT, AgentPage, AgentQuery, ExecutionQuery, ListsExecutions

router = APIRouter(prefix="/v1", tags=["executions"])

LIST_ERRORS: dict[int | str, dict[str, object]] = {
    **ERRORS,
    501: {"model": ErrorOut, "description": "This store cannot list executions and agents"},
}
CURSOR = r"^[A-Za-z0-9_-]+$"


def _lister(service: Service) -> ListsExecutions:
    store = service.store
    if not isinstance(store, ListsExecutions):
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"{type(store).__name__} cannot list executions")
    return store


@router.get("/executions", responses=LIST_ERRORS, summary="List executions, newest activity first")
async def list_executions(
    service: ServiceDep,
    who: Annotated[Principal, Depends(reader)],
    q: Annotated[str | None, Query(description="Execution id, or the start of one as text (hex digits and '-')",
                                   min_length=1, max_length=36, pattern=r"^[0-9A-Fa-f-]+$")] = None,
    agent: Annotated[str | None, Query(description="Took part as sender or direct recipient", min_length=1,
                                       max_length=200, pattern=TOKEN_PATTERN)] = None,
    message_type: Annotated[str | None, Query(alias="type", description="Has a message of this message_type",
                                              min_length=1, max_length=200)] = None,
    since: Annotated[IsoDateTime | None, Query(description="last activity >= since (with a timezone)")] = None,
    until: Annotated[IsoDateTime | None, Query(description="last activity < until (with a timezone)")] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged (opaque)",
                                        max_length=128, pattern=CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
) -> ExecutionList:
    """Executions with retained messages, the one with the newest message first.

    Activity times are the server's ``stored_at``. Each item names up to 20
    agents and message types and counts them all.
    """
    query = ExecutionQuery(id_prefix=None if q is None else q.lower(), agent_id=agent, message_type=message_type,
                           since=since, until=until, cursor=cursor, limit=limit)
    query.validate()
    page = await _lister(service).list_executions(query)
    return ExecutionList(items=[ExecutionSummaryOut.of(i) for i in page.items], next_cursor=page.next_cursor)


@router.get("/agents", responses=LIST_ERRORS, summary="List agents seen in the history or with an inbox")
async def list_agents(
    service: ServiceDep,
    who: Annotated[Principal, Depends(reader)],
    q: Annotated[str | None, Query(description="The start of the agent id", min_length=1, max_length=200)] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged (opaque)",
                                        max_length=1100, pattern=CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
) -> AgentList:
    """Agents that sent a message, were a direct recipient or have an inbox on the broker, by id, with
    counts, domain, last activity and whether their inbox is open.

    Their messages: ``GET /v1/messages?agent_id=``.
    """
    query = AgentQuery(prefix=q, cursor=cursor, limit=limit)
    query.validate()
    page, kind = await asyncio.gather(_lister(service).list_agents(query),
                                      service.presence.refresh(service.bus.backend))
    present = service.presence.agents if kind is not None and service.presence.up else {}
    items = [_with_inbox(AgentOut.of(i), present.get(i.agent_id), kind) for i in page.items]
    seen = {i.agent_id for i in page.items}
    extra = [_with_inbox(_only_inbox(p), p, kind) for p in _in_range(present.values(), q, cursor, page)
             if p.agent_id not in seen]
    if extra:
        items = sorted(items + extra, key=lambda a: a.agent_id)
    inboxes = "unreported" if kind is None else kind if service.presence.up else "unavailable"
    return AgentList(items=items, next_cursor=page.next_cursor, inboxes=inboxes)


def _in_range(present: Iterable[InboxPresence], prefix: str | None, cursor: str | None,
              page: AgentPage) -> list[InboxPresence]:
    """Those of ``present`` whose ids fall in this page: after the cursor's agent, up to the next cursor's."""
    after = None if cursor is None else decode_agent_cursor(cursor)
    upto = None if page.next_cursor is None else decode_agent_cursor(page.next_cursor)
    return [p for p in present
            if (prefix is None or p.agent_id.startswith(prefix)) and (after is None or p.agent_id > after)
            and (upto is None or p.agent_id <= upto)]


def _only_inbox(p: InboxPresence) -> AgentOut:
    return AgentOut(agent_id=p.agent_id, domain=None, last_activity_at=None, messages_sent=0, messages_received=0)


def _with_inbox(agent: AgentOut, presence: InboxPresence | None, kind: InboxKind | None) -> AgentOut:
    if presence is None or kind is None:
        return agent
    agent.inbox, agent.inbox_holder, agent.inbox_since = kind, presence.holder, presence.since
    return agent
