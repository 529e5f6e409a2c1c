"""The execution and agent lists on SQLite (see :class:`~squadbus.store.base.ListsExecutions`).

Costs: a page of executions walks the ``exec_counters_activity`` index
newest first (the ``agent`` filter first reads that agent's messages through
the sender and recipient indexes; the ``type`` filter probes
``messages_execution_type`` once per execution walked), then reads the rows
of the page's executions once, grouped. A page of agents is a skip scan of
the sender and recipient indexes (one index probe per agent), then counts
each agent's messages through those indexes and reads at most
``DOMAIN_LOOKBACK`` bodies per agent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
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

Read = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]


async def list_executions(read: Read, q: ExecutionQuery) -> ExecutionPage:
    """One page of executions, newest activity first."""
    q.validate()
    where = ["task_execution_id IS NOT NULL"]
    params: list[Any] = []
    if q.cursor is not None:
        where.append("(last_at, exec_key) < (?, ?)")
        params += li.decode_execution_cursor(q.cursor)
    exact, prefix = li.id_prefix_filter(q.id_prefix)
    if exact is not None:
        where.append("exec_key = ?")
        params.append(exact)
    elif prefix is not None:
        where.append("substr(exec_key, 1, ?) = ?")
        params += [len(prefix), prefix]
    if q.since is not None:
        where.append("last_at >= ?")
        params.append(c.to_micros(q.since))
    if q.until is not None:
        where.append("last_at < ?")
        params.append(c.to_micros(q.until))
    if q.agent_id is not None:
        where.append("task_execution_id IN (SELECT task_execution_id FROM messages WHERE sender_id = ?"
                     " UNION SELECT task_execution_id FROM messages WHERE recipient_id = ?)")
        params += [q.agent_id, q.agent_id]
    if q.message_type is not None:
        where.append("EXISTS (SELECT 1 FROM messages AS m WHERE m.task_execution_id = exec_counters.task_execution_id"
                     " AND m.message_type = ?)")
        params.append(c.index_text(q.message_type))
    rows = await read(
        "SELECT task_execution_id, last_at, exec_key FROM exec_counters WHERE " + " AND ".join(where)
        + " ORDER BY last_at DESC, exec_key DESC LIMIT ?",
        [*params, q.limit + 1],
    )
    more, rows = len(rows) > q.limit, rows[:q.limit]
    if not rows:
        return ExecutionPage(items=[], next_cursor=None)
    ids = [bytes(row[0]) for row in rows]
    groups = await read(
        "SELECT task_execution_id, sender_id, recipient_id, message_type, count(*), min(stored_at) FROM messages"
        f" WHERE task_execution_id IN ({','.join('?' * len(ids))})"
        " GROUP BY task_execution_id, sender_id, recipient_id, message_type",
        ids,
    )
    page = [(UUID(bytes=bytes(raw)), c.from_micros(int(last_at))) for raw, last_at, _ in rows]
    items = li.summaries(
        page,
        ((UUID(bytes=bytes(e)), s, r, t, int(n), c.from_micros(int(first))) for e, s, r, t, n, first in groups),
    )
    last = rows[-1]
    cursor = li.encode_execution_cursor(int(last[1]), UUID(last[2])) if more else None
    return ExecutionPage(items=items, next_cursor=cursor)


def _skip_scan(cte: str, column: str, start_op: str, bounded: bool) -> str:
    # one index probe per distinct value: the next value after the previous one
    upper = f" AND {column} < ?" if bounded else ""
    return (f"{cte}(a) AS (SELECT (SELECT {column} FROM messages WHERE {column} {start_op} ?{upper}"
            f" ORDER BY {column} LIMIT 1) UNION ALL SELECT (SELECT {column} FROM messages WHERE {column} > {cte}.a"
            f"{upper} ORDER BY {column} LIMIT 1) FROM {cte} WHERE {cte}.a IS NOT NULL LIMIT ?)")


async def list_agents(read: Read, q: AgentQuery) -> AgentPage:
    """One page of agents in code-point order of their ids."""
    q.validate()
    prefix = q.prefix or ""
    after = None if q.cursor is None else li.decode_agent_cursor(q.cursor)
    if after is not None and after >= prefix:
        start_op, start = ">", after
    else:
        start_op, start = ">=", prefix
    upper = li.prefix_upper(prefix) if prefix else None
    bound = [upper] if upper is not None else []
    scan_params = [start, *bound, *bound, q.limit + 2]
    bounded = upper is not None
    found = await read(
        f"WITH RECURSIVE {_skip_scan('s', 'sender_id', start_op, bounded)},"
        f" {_skip_scan('r', 'recipient_id', start_op, bounded)}"
        " SELECT a FROM s WHERE a IS NOT NULL UNION SELECT a FROM r WHERE a IS NOT NULL ORDER BY a LIMIT ?",
        [*scan_params, *scan_params, q.limit + 1],
    )
    agents = [str(row[0]) for row in found if str(row[0]).startswith(prefix)]
    more, agents = len(agents) > q.limit, agents[:q.limit]
    if not agents:
        return AgentPage(items=[], next_cursor=None)
    marks = ",".join("?" * len(agents))
    sent = {a: (int(n), int(pk)) for a, n, pk in await read(
        f"SELECT sender_id, count(*), max(pk) FROM messages WHERE sender_id IN ({marks}) GROUP BY sender_id", agents)}
    received = {a: (int(n), int(pk)) for a, n, pk in await read(
        f"SELECT recipient_id, count(*), max(pk) FROM messages WHERE recipient_id IN ({marks}) GROUP BY recipient_id",
        agents)}
    latest = {a: max(sent.get(a, (0, 0))[1], received.get(a, (0, 0))[1]) for a in agents}
    pks = sorted(set(latest.values()))
    times = {int(pk): c.from_micros(int(at)) for pk, at in await read(
        f"SELECT pk, stored_at FROM messages WHERE pk IN ({','.join('?' * len(pks))})", pks)}
    items: list[AgentSummary] = []
    for agent in agents:
        if latest[agent] not in times:
            continue  # deleted between the reads
        domain = None
        if agent in sent:
            bodies = await read(
                "SELECT CASE WHEN length(body) <= ? THEN body END FROM messages WHERE sender_id = ?"
                " ORDER BY pk DESC LIMIT ?", [li.DOMAIN_BODY_BYTES, agent, DOMAIN_LOOKBACK])
            domain = li.domain_of(row[0] for row in bodies)
        items.append(AgentSummary(
            agent_id=agent, domain=domain, last_activity_at=times[latest[agent]],
            messages_sent=sent.get(agent, (0, 0))[0], messages_received=received.get(agent, (0, 0))[0],
        ))
    return AgentPage(items=items, next_cursor=li.encode_agent_cursor(agents[-1]) if more else None)
