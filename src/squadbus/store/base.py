"""The HistoryStore contract: what the db-writer writes and the service reads.

Every message the squad sends is kept once (unique by ``id``) with a
per-execution sequence number ``seq`` (1, 2, 3, ... gap-free at write time),
which is the SSE event id. Messages without a ``task_execution_id`` share one
sequence of their own. Two engines implement :class:`HistoryStore` with the
same schema and the same behaviour: SQLite (embedded default) and PostgreSQL.

Errors: a store raises :class:`~squadbus.core.errors.ConnectionLost` when the
database is unreachable, :class:`~squadbus.core.errors.BackendTimeout` when it
does not answer in time (e.g. SQLite locked), another
:class:`~squadbus.core.errors.BackendError` for any other database failure,
:class:`InvalidQuery` (a ``ValueError``) for a bad cursor or limit, and
:class:`~squadbus.core.errors.Closed` after ``close()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable
from uuid import UUID

from squadbus.core.envelope import Message
from squadbus.core.errors import ConfigError

MAX_LIMIT = 1000


class InvalidQuery(ConfigError):
    """A history query is malformed: bad cursor, limit out of 1..1000, since >= until."""


def _check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise InvalidQuery(f"limit must be between 1 and {maximum}, got {limit}")


def _check_aware(**times: datetime | None) -> None:
    for name, value in times.items():
        if value is not None and value.tzinfo is None:
            raise InvalidQuery(f"{name} must be timezone-aware")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as stored.

    ``seq`` is the per-execution sequence number (1-based, gap-free at write
    time; messages with ``task_execution_id`` None share one sequence);
    ``stored_at`` is the store's UTC timestamp; ``message`` is exactly the
    message as published. ``position`` is the row's place in the store's one
    global order (the history cursor's key, ascending in stored order, never
    reused): set on rows read back (``get``, ``query``, ``after``), None on
    the rows ``write`` returns. It takes no part in equality.
    """

    seq: int
    stored_at: datetime
    message: Message
    position: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryQuery:
    """Filters of :meth:`HistoryStore.query`; every filter given must match.

    ``agent_id`` matches the sender OR the recipient; ``since`` is inclusive
    and ``until`` exclusive, both on ``created_at``; ``cursor`` comes from a
    previous :attr:`HistoryPage.next_cursor` of the same filters.
    ``max_bytes`` bounds a page by size as well: it ends before the row whose
    stored body would take the page's bodies past that many bytes (a page
    holds at least one row), and ``next_cursor`` continues after it.
    """

    task_execution_id: UUID | None = None
    agent_id: str | None = None
    message_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cursor: str | None = None
    limit: int = 100
    max_bytes: int | None = None

    def validate(self) -> None:
        """Raise :class:`InvalidQuery` when the limit or time range is invalid."""
        _check_limit(self.limit, MAX_LIMIT)
        if self.max_bytes is not None and self.max_bytes < 1:
            raise InvalidQuery(f"max_bytes must be positive, got {self.max_bytes}")
        _check_aware(since=self.since, until=self.until)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a query; ``next_cursor`` is None when there is nothing more."""

    items: list[StoredMessage]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class ExecutionSnapshot:
    """What the store currently retains of one execution.

    ``first_seq`` is the lowest retained seq (0 if none): above 1 it means
    retention removed the older ones. ``last_seq`` is 0 if none. ``agents``
    are the sorted distinct sender and recipient ids.
    """

    task_execution_id: UUID
    message_count: int
    first_seq: int
    last_seq: int
    agents: list[str]
    last_message_at: datetime | None


@runtime_checkable
class HistoryStore(Protocol):
    """Where history lives. Every method is safe to call concurrently.

    Contracts:

    * ``open()`` connects and runs pending migrations (idempotent, safe with
      several processes opening the same database); ``close()`` is idempotent.
    * ``write(messages)`` is one transaction, idempotent by ``message.id``:
      it returns one :class:`StoredMessage` per input, in input order; a
      message already stored (or repeated in the batch) returns the existing
      row unchanged. New messages get seqs in input order per execution,
      without gaps or duplicates even with several concurrent writers. When it
      raises, nothing of the batch was written, or (connection lost during
      COMMIT) all of it was: writing the batch again is always safe.
    * ``query(q)`` returns rows in stored order (ascending), ``q.limit`` at
      most; following ``next_cursor`` visits every matching row once.
    * ``after(execution, seq)`` returns that execution's rows with a larger
      seq, ascending (SSE resume); with ``max_bytes`` it stops before the row
      whose stored body would take the rows' bodies past it (at least one row).
    * ``delete_older_than(cutoff)`` removes rows stored before ``cutoff``
      (retention); seqs are never reused, so :meth:`snapshot` reveals the gap.
      A store that also :class:`ClaimsIds` removes the claims made before
      ``cutoff`` with them (the count returned is of messages only).
    * A row that cannot be decoded is logged and skipped, never raised.
    """

    url: str

    async def open(self) -> None:
        """Connect and migrate (idempotent)."""
        ...

    async def close(self) -> None:
        """Release connections (idempotent)."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        """Store ``messages`` in one transaction; see the class contract."""
        ...

    async def get(self, message_id: UUID) -> StoredMessage | None:
        """The stored message with this id, or None."""
        ...

    async def query(self, q: HistoryQuery) -> HistoryPage:
        """One page of messages matching ``q``, in stored order."""
        ...

    async def after(
        self, task_execution_id: UUID, after_seq: int, limit: int = 1000, *, max_bytes: int | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` rows (and ``max_bytes`` of bodies) of one execution with ``seq > after_seq``, by seq."""
        ...

    async def snapshot(self, task_execution_id: UUID) -> ExecutionSnapshot:
        """Counts, seq bounds and agents of one execution as currently retained."""
        ...

    async def delete_older_than(self, cutoff: datetime) -> int:
        """Delete rows stored before ``cutoff``; returns how many were deleted."""
        ...

    async def ping(self) -> None:
        """Return if the database answers; raise a BackendError subclass otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class IdClaim:
    """A claim on a message id: the message ``sender_id`` means to send under it.

    ``fingerprint`` is the caller's digest of that message (the store only
    compares it): two claims with equal fingerprints are the same message.
    """

    id: UUID
    sender_id: str
    fingerprint: bytes


@runtime_checkable
class ClaimsIds(Protocol):
    """A store that records id claims, so replicas sharing it agree on who may publish under an id.

    Contract of ``claim(claims)``, one transaction, atomic across processes
    sharing the database: each id not yet claimed is recorded with its claim;
    the result is the claim holding each id, in input order (an id repeated in
    ``claims`` keeps its first claim). That is the given claim when it now
    holds (new, or the same fingerprint claimed earlier: a retry of the same
    message, which is not refused) and the other claim when a different
    fingerprint holds the id. If any id is held by a different fingerprint,
    nothing of the call is recorded. Claims are kept until
    ``delete_older_than`` removes those made before its cutoff; releasing a
    claim is never needed, since its own message can always claim again.
    """

    async def claim(self, claims: Sequence[IdClaim]) -> list[IdClaim]:
        """Claim each id for its message (see the class contract); raises a BackendError subclass on failure."""
        ...


@runtime_checkable
class ClaimsIdGroups(ClaimsIds, Protocol):
    """A :class:`ClaimsIds` store that also decides many callers' claims in one transaction (group commit).

    Contract of ``claim_groups(groups)``, one transaction, atomic across
    processes sharing the database: the groups are decided one after another
    in input order, each exactly as ``claim(group)`` would be at that point,
    and the result is what that call would return, one list per group. So a
    group is all or nothing on its own: one with an id held by a different
    fingerprint (by another transaction, or by an earlier group of this call)
    records nothing, and neither fails nor changes the outcome of any other
    group. ``claim(claims)`` is ``claim_groups([claims])[0]``.
    """

    async def claim_groups(self, groups: Sequence[Sequence[IdClaim]]) -> list[list[IdClaim]]:
        """Decide each group of claims on its own, all in one transaction (see the class contract)."""
        ...


MAX_LIST_LIMIT = 500
LISTED = 20
"""How many agents and message types an :class:`ExecutionSummary` names (it counts them all)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionQuery:
    """Filters of :meth:`ListsExecutions.list_executions`; every filter given must match.

    ``id_prefix``: the start of the execution id as text (lowercase hex and
    ``-``, as ``str(UUID)`` writes it; a whole id matches exactly).
    ``agent_id``: took part as sender or direct recipient. ``message_type``:
    at least one message of that type. ``since`` (inclusive) and ``until``
    (exclusive) bound the last activity. ``cursor`` comes from a previous
    :attr:`ExecutionPage.next_cursor` of the same filters.
    """

    id_prefix: str | None = None
    agent_id: str | None = None
    message_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cursor: str | None = None
    limit: int = 100

    def validate(self) -> None:
        """Raise :class:`InvalidQuery` when the limit, prefix or time range is invalid."""
        _check_limit(self.limit, MAX_LIST_LIMIT)
        prefix = self.id_prefix
        if prefix is not None and (len(prefix) > 36 or prefix.strip("0123456789abcdef-")):
            raise InvalidQuery(f"q must be the start of an execution id (hex digits and '-'), got {prefix[:40]!r}")
        _check_aware(since=self.since, until=self.until)


@dataclass(frozen=True, slots=True)
class ExecutionSummary:
    """One execution as currently retained.

    ``first_activity_at`` / ``last_activity_at`` are the store's ``stored_at``
    of its first retained and its last message. ``agents`` are the first
    :data:`LISTED` of its distinct senders and direct recipients in sorted
    order, ``agent_count`` how many there are; ``message_types`` and
    ``message_type_count`` likewise.
    """

    task_execution_id: UUID
    message_count: int
    first_activity_at: datetime
    last_activity_at: datetime
    agents: list[str]
    agent_count: int
    message_types: list[str]
    message_type_count: int


@dataclass(frozen=True, slots=True)
class ExecutionPage:
    """One page of executions, newest activity first; ``next_cursor`` is None when there is nothing more."""

    items: list[ExecutionSummary]
    next_cursor: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentQuery:
    """Filters of :meth:`ListsExecutions.list_agents`: ``prefix`` of the agent id, ``cursor``, ``limit``."""

    prefix: str | None = None
    cursor: str | None = None
    limit: int = 100

    def validate(self) -> None:
        """Raise :class:`InvalidQuery` when the limit is out of range."""
        _check_limit(self.limit, MAX_LIST_LIMIT)


@dataclass(frozen=True, slots=True)
class AgentSummary:
    """An agent seen in the retained history, as sender or as direct recipient.

    ``domain`` is the ``domain`` of the newest of the last
    :data:`DOMAIN_LOOKBACK` messages it sent that names one (messages over
    64 KiB are not read for it), None when none does: the store keeps no
    other record of an agent's domain. ``messages_received`` counts direct
    messages only (broadcasts name no recipient). ``last_activity_at`` is the
    ``stored_at`` of its newest message, sent or received.
    """

    agent_id: str
    domain: str | None
    last_activity_at: datetime
    messages_sent: int
    messages_received: int


DOMAIN_LOOKBACK = 5


@dataclass(frozen=True, slots=True)
class AgentPage:
    """One page of agents in agent-id order; ``next_cursor`` is None when there is nothing more."""

    items: list[AgentSummary]
    next_cursor: str | None


@runtime_checkable
class ListsExecutions(Protocol):
    """A store that lists the executions and agents of its history (the dashboard's lists).

    Contracts:

    * ``list_executions(q)``: executions with at least one retained message,
      by last activity (newest first, ties by id), ``q.limit`` at most;
      following ``next_cursor`` visits every matching execution once while
      nothing is written. An execution that gets a message meanwhile moves to
      the front: a reader already past it does not see it again.
    * ``list_agents(q)``: agents in the engine's text order of their ids
      (SQLite: code points; PostgreSQL: the database collation), ``q.limit``
      at most; following ``next_cursor`` visits every agent once.
    * Both raise :class:`InvalidQuery` for a bad cursor, limit or filter.
    """

    async def list_executions(self, q: ExecutionQuery) -> ExecutionPage:
        """One page of executions matching ``q`` (see the class contract)."""
        ...

    async def list_agents(self, q: AgentQuery) -> AgentPage:
        """One page of agents matching ``q`` (see the class contract)."""
        ...


def open_store(url: str) -> HistoryStore:
    """A (not yet opened) store for ``url``.

    ``sqlite+aiosqlite:///./squadbus.db`` (relative path), ``sqlite+aiosqlite:////abs/path.db``,
    ``sqlite+aiosqlite:///:memory:``; ``postgresql://user@host:port/db`` (also
    ``postgresql+asyncpg://`` and ``postgres://``). Raises ConfigError for an
    unknown scheme, ImportError naming the extra when the driver is missing.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        from squadbus.store.sqlite import SqliteStore

        return SqliteStore(url)
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        from squadbus.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ConfigError(f"unknown store URL {url!r}: expected sqlite+aiosqlite:///PATH or postgresql://...")
