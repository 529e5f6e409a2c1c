"""The execution and agent lists on PostgreSQL (see :class:`~squadbus.store.base.ListsExecutions`).

Same plan as SQLite (:mod:`squadbus.store._listing_sqlite`), with one
difference for agents: ids are compared in the database collation (the one
its indexes use), where ids sharing a prefix need not be contiguous, so a
``prefix`` search walks the agents from the prefix on until it has a page
(one index probe per agent walked) instead of stopping at the prefix's end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from squadbus.store import _common as c
from squadbus.store import _listing as li
from squadbus.store.base import (
    DOMAIN_LOOKBACK,
    AgentPage,
    AgentQuery,
    AgentSummary,
    ExecutionPage,
    ExecutionQuery,
)

Fetch = Callable[..., Awaitable[list[Any]]]


async def list_executions(fetch: Fetch, q: ExecutionQuery) -> ExecutionPage:
    """One page of executions, newest activity first."""
    q.validate()
    where = ["task_execution_id IS NOT NULL"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if q.cursor is not None:
        micros, key = li.decode_execution_cursor(q.cursor)
        where.append(f"(last_at, exec_key) < ({arg(c.from_micros(micros))}::timestamptz, {arg(key)}::text)")
    exact, prefix = li.id_prefix_filter(q.id_prefix)
    if exact is not None:
        where.append(f"exec_key = {arg(exact)}")
    elif prefix is not None:
        where.append(f"starts_with(exec_key, {arg(prefix)})")
    if q.since is not None:
        where.append(f"last_at >= {arg(q.since)}")
    if q.until is not None:
        where.append(f"last_at < {arg(q.until)}")
    if q.agent_id is not None:
        agent = arg(c.index_text(q.agent_id))
        where.append(f"task_execution_id IN (SELECT task_execution_id FROM messages WHERE sender_id = {agent}"
                     f" UNION SELECT task_execution_id FROM messages WHERE recipient_id = {agent})")
    if q.message_type is not None:
        where.append("EXISTS (SELECT 1 FROM messages AS m WHERE m.task_execution_id = exec_counters.task_execution_id"
                     f" AND m.message_type = {arg(c.index_text(q.message_type))})")
    rows = await fetch(
        "SELECT task_execution_id, last_at, exec_key FROM exec_counters WHERE " + " AND ".join(where)
        + f" ORDER BY last_at DESC, exec_key DESC LIMIT {arg(q.limit + 1)}",
        *args,
    )
    more, rows = len(rows) > q.limit, rows[:q.limit]
    if not rows:
        return ExecutionPage(items=[], next_cursor=None)
    groups = await fetch(
        "SELECT task_execution_id, sender_id, recipient_id, message_type, count(*), min(stored_at) FROM messages"
        " WHERE task_execution_id = ANY($1::uuid[]) GROUP BY task_execution_id, sender_id, recipient_id, message_type",
        [row[0] for row in rows],
    )
    items = li.summaries(
        ((UUID(bytes=row[0].bytes), row[1]) for row in rows),
        ((UUID(bytes=e.bytes), s, r, t, int(n), first) for e, s, r, t, n, first in groups),
    )
    last = rows[-1]
    cursor = li.encode_execution_cursor(c.to_micros(last[1]), UUID(bytes=last[0].bytes)) if more else None
    return ExecutionPage(items=items, next_cursor=cursor)


def _skip_scan(cte: str, column: str, start_op: str) -> str:
    # one index probe per distinct value; m counts the values matching the prefix ($2) so far
    return (f"{cte}(a, m) AS (SELECT x.a, coalesce(starts_with(x.a, $2)::int, 0) FROM (SELECT {column} AS a"
            f" FROM messages WHERE {column} {start_op} $1 ORDER BY {column} LIMIT 1) AS x"
            f" UNION ALL SELECT x.a, {cte}.m + coalesce(starts_with(x.a, $2)::int, 0) FROM {cte} CROSS JOIN LATERAL"
            f" (SELECT {column} AS a FROM messages WHERE {column} > {cte}.a ORDER BY {column} LIMIT 1) AS x"
            f" WHERE {cte}.m < $3)")


async def list_agents(fetch: Fetch, q: AgentQuery) -> AgentPage:
    """One page of agents in the database collation's order of their ids."""
    q.validate()
    prefix = c.index_text(q.prefix or "")
    after = None if q.cursor is None else c.index_text(li.decode_agent_cursor(q.cursor))
    start_op, start = (">", after) if after is not None else (">=", prefix)
    found = await fetch(
        f"WITH RECURSIVE {_skip_scan('s', 'sender_id', start_op)}, {_skip_scan('r', 'recipient_id', start_op)}"
        " SELECT a FROM s WHERE starts_with(a, $2) UNION SELECT a FROM r WHERE starts_with(a, $2)"
        " ORDER BY a LIMIT $3",
        start, prefix, q.limit + 1,
    )
    agents = [str(row[0]) for row in found]
    more, agents = len(agents) > q.limit, agents[:q.limit]
    if not agents:
        return AgentPage(items=[], next_cursor=None)
    stats = await fetch(
        "SELECT a.agent,"
        " (SELECT count(*) FROM messages WHERE sender_id = a.agent),"
        " (SELECT count(*) FROM messages WHERE recipient_id = a.agent),"
        " (SELECT stored_at FROM messages WHERE pk = greatest("
        "   (SELECT max(pk) FROM messages WHERE sender_id = a.agent),"
        "   (SELECT max(pk) FROM messages WHERE recipient_id = a.agent)))"
        " FROM unnest($1::text[]) AS a(agent)",
        agents,
    )
    bodies = await fetch(
        "SELECT a.agent, b.body FROM unnest($1::text[]) WITH ORDINALITY AS a(agent, ord) CROSS JOIN LATERAL"
        " (SELECT CASE WHEN octet_length(body) <= $2 THEN body END AS body, pk FROM messages"
        "  WHERE sender_id = a.agent ORDER BY pk DESC LIMIT $3) AS b ORDER BY a.ord, b.pk DESC",
        agents, li.DOMAIN_BODY_BYTES, DOMAIN_LOOKBACK,
    )
    by_agent: dict[str, list[Any]] = {}
    for agent, body in bodies:
        by_agent.setdefault(agent, []).append(body)
    items = [
        AgentSummary(agent_id=agent, domain=li.domain_of(by_agent.get(agent, [])), last_activity_at=last_at,
                     messages_sent=int(sent), messages_received=int(received))
        for agent, sent, received, last_at in stats
        if last_at is not None
    ]
    return AgentPage(items=items, next_cursor=li.encode_agent_cursor(agents[-1]) if more else None)
