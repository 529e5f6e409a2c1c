"""``GET /v1/executions`` and ``GET /v1/agents``: the lists the dashboard browses.

Read access is the history's (:func:`~squadbus.service.auth.reader`): every
role, agent tokens included, lists every execution and agent, as they read
every execution's history (docs/security.md). One agent's messages are
``GET /v1/messages?agent_id=``. Both lists page with an opaque cursor; a
cursor that is not a ``next_cursor`` of the same list is a 422.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from squadbus.service.auth import Principal, reader
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
from squadbus.store.base import MAX_LIST_LIMIT, AgentQuery, ExecutionQuery, ListsExecutions

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


@router.get("/agents", responses=LIST_ERRORS, summary="List agents seen in the history")
async def list_agents(
    service: ServiceDep,
    who: Annotated[Principal, Depends(reader)],
    q: Annotated[str | None, Query(description="The start of the agent id", min_length=1, max_length=200)] = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page, unchanged (opaque)",
                                        max_length=1100, pattern=CURSOR)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 100,
) -> AgentList:
    """Agents that sent a message or were a direct recipient, by id, with counts, domain and last activity.

    Their messages: ``GET /v1/messages?agent_id=``.
    """
    query = AgentQuery(prefix=q, cursor=cursor, limit=limit)
    query.validate()
    page = await _lister(service).list_agents(query)
    return AgentList(items=[AgentOut.of(i) for i in page.items], next_cursor=page.next_cursor)
