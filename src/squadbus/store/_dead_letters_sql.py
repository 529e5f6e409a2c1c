"""The dead-letter table's SQL, shared by both engines (see :mod:`squadbus.store.dead_letters`).

Statements are written with ``?`` placeholders; :class:`Dialect` numbers them
for PostgreSQL (``$1``…) and converts ids and times to each engine's column
types (SQLite: 16-byte blobs and integer microseconds; PostgreSQL: uuid and
timestamptz). Every write is one statement, so each engine runs it in its own
transaction; keeping is idempotent, settling a compare-and-set.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from squadbus.core import envelope
from squadbus.core.envelope import Message, utcnow
from squadbus.core.errors import InvalidMessage
from squadbus.store import _common as c
from squadbus.store.dead_letters import (
    DeadLetter,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterState,
    facts_of,
    is_dead_letter,
)

logger = logging.getLogger("squadbus.store")

Read = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]
Change = Callable[[str, Sequence[Any]], Awaitable[int]]
"""Runs one statement in its own transaction and returns the number of rows it changed."""

_COLUMNS = "pk, body, stored_at, state, settled_at, settled_by, redriven_as"


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one engine spells placeholders, ids and times."""

    numbered: bool

    def sql(self, text: str) -> str:
        if not self.numbered:
            return text
        counter = iter(range(1, 1000))
        return re.sub(r"\?", lambda _: f"${next(counter)}", text)

    def uuid(self, value: UUID) -> Any:
        return value if self.numbered else value.bytes

    def from_uuid(self, value: Any) -> UUID | None:
        if value is None:
            return None
        return value if isinstance(value, UUID) else UUID(bytes=bytes(value))

    def time(self, value: datetime) -> Any:
        return value if self.numbered else c.to_micros(value)

    def from_time(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return value if isinstance(value, datetime) else c.from_micros(int(value))


SQLITE = Dialect(numbered=False)
POSTGRES = Dialect(numbered=True)


async def keep(d: Dialect, change: Change, messages: Sequence[Message]) -> int:
    """Insert each dead letter once by id; returns how many were new."""
    now = utcnow()
    new = 0
    for message in messages:
        if not is_dead_letter(message):
            continue
        body = c.encode_body(message)
        new += await change(d.sql(
            "INSERT INTO dead_letters (id, grp, state, dead_at, stored_at, body) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING"),
            (d.uuid(message.id), c.index_text(facts_of(message).group), DeadLetterState.DEAD.value,
             d.time(message.created_at), d.time(now), body))
    return new


def _row(d: Dialect, row: Sequence[Any]) -> DeadLetter | None:
    pk, body, stored_at, state, settled_at, settled_by, redriven_as = row
    try:
        message = envelope.decode(bytes(body), max_content_bytes=1 << 62)
    except InvalidMessage as exc:
        logger.warning("skipping unreadable dead letter row pk=%s: %s", pk, exc)
        return None
    stored = d.from_time(stored_at)
    assert stored is not None
    return DeadLetter(message=message, facts=facts_of(message), stored_at=stored, position=int(pk),
                      state=DeadLetterState(state), settled_at=d.from_time(settled_at), settled_by=settled_by,
                      redriven_as=d.from_uuid(redriven_as))


async def get(d: Dialect, read: Read, dead_letter_id: UUID) -> DeadLetter | None:
    """The row with this id, or None."""
    rows = await read(d.sql(f"SELECT {_COLUMNS} FROM dead_letters WHERE id = ?"), (d.uuid(dead_letter_id),))
    return _row(d, rows[0]) if rows else None


async def page(d: Dialect, read: Read, q: DeadLetterQuery) -> DeadLetterPage:
    """One page, newest first (keyset on ``pk``)."""
    q.validate()
    where: list[str] = []
    params: list[Any] = []
    if q.cursor is not None:
        where.append("pk < ?")
        params.append(c.decode_cursor(q.cursor))
    if q.state is not None:
        where.append("state = ?")
        params.append(q.state.value)
    if q.group is not None:
        where.append("grp = ?")
        params.append(q.group)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = await read(d.sql(f"SELECT {_COLUMNS} FROM dead_letters {clause} ORDER BY pk DESC LIMIT ?"),
                      (*params, q.limit + 1))
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    items = [item for item in (_row(d, r) for r in rows) if item is not None]
    return DeadLetterPage(items=items, next_cursor=c.encode_cursor(int(rows[-1][0])) if more and rows else None)


async def settle(d: Dialect, change: Change, dead_letter_id: UUID, state: DeadLetterState, by: str,
                 redriven_as: UUID | None) -> bool:
    """Compare-and-set ``dead`` -> ``state``."""
    if state is DeadLetterState.DEAD:
        raise ValueError("settle to redriven or discarded")
    changed = await change(d.sql(
        "UPDATE dead_letters SET state = ?, settled_at = ?, settled_by = ?, redriven_as = ?"
        " WHERE id = ? AND state = ?"),
        (state.value, d.time(utcnow()), by, None if redriven_as is None else d.uuid(redriven_as),
         d.uuid(dead_letter_id), DeadLetterState.DEAD.value))
    return changed > 0


async def reopen(d: Dialect, change: Change, dead_letter_id: UUID, redriven_as: UUID) -> bool:
    """Undo a re-drive that was not published."""
    changed = await change(d.sql(
        "UPDATE dead_letters SET state = ?, settled_at = NULL, settled_by = NULL, redriven_as = NULL"
        " WHERE id = ? AND state = ? AND redriven_as = ?"),
        (DeadLetterState.DEAD.value, d.uuid(dead_letter_id), DeadLetterState.REDRIVEN.value, d.uuid(redriven_as)))
    return changed > 0


async def counts(d: Dialect, read: Read, since: datetime) -> dict[str, int]:
    """Dead letters with ``dead_at >= since`` by group."""
    rows = await read(d.sql("SELECT grp, count(*) FROM dead_letters WHERE dead_at >= ? GROUP BY grp"),
                      (d.time(since),))
    return {str(g): int(n) for g, n in rows}
