"""The PostgreSQL history store (asyncpg, connection pool).

How a batch is written, in one transaction (READ COMMITTED):

* copy path, for batches of ``_COPY_MIN`` messages or more: lock the
  counters of the batch's executions (sorted key order) and add the batch's
  counts to them in one upsert, count seqs on from the old values, ``COPY``
  the rows into ``messages``. COPY has no ``ON CONFLICT``: a stored id makes
  it fail (unique violation), the transaction (counters too) is rolled back
  and the batch goes the careful way. Measured
  with 1 KiB messages in batches of 500, fsync on, one connection, on the
  same server: 24.9k rows/s against 17.4k for the one-statement upsert
  below (``ON CONFLICT`` and the CTE cost more than sending the rows); in
  ``bench/bench_persist.py`` the store alone went from 16.2k to 30.6-34.7k
  rows/s. Below ``_COPY_MIN`` the upsert's single round trip wins;
* fast path, one statement: an upsert adds the batch's per-execution counts
  to ``exec_counters`` (locking those rows, in sorted key order so writers
  do not deadlock) and the same statement inserts the rows with seqs counted
  back from the new counter values, ``ON CONFLICT (id) DO NOTHING``. If any
  row was skipped as a duplicate, the counters moved too far: the
  transaction is rolled back and the batch goes the careful way;
* careful path: lock the counters of the batch's executions, look up which
  ids are already stored (duplicates return those rows; a concurrent writer
  of the same id holds the same execution's lock, so this read sees its
  commit), insert only the new rows with seqs from the locked counters, then
  store the new counters. A row skipped even so (an id reused for another
  execution by a concurrent writer) retries the transaction rather than
  leaving a seq gap.

Claiming ids (``claim_groups``, several callers' claims at once, see
:class:`~squadbus.store.base.ClaimsIdGroups`; ``claim`` is one group) is one
transaction too, deciding each group on its own:

1. insert, in one statement in id order, the first claim of each id of any
   group, ``ON CONFLICT (id) DO NOTHING`` (an insert that meets another
   transaction's uncommitted claim waits for its end), returning the ids it
   inserted: this transaction now holds the lock on every free id;
2. read the claims holding the ids: those it did not insert are committed
   claims of others, which no one can change before this commit;
3. decide the groups one after another in input order against those
   claims (one that meets another fingerprint is refused, the others hold);
4. fix its own rows: delete those no holding group wanted (their groups were
   refused), rewrite those a later group holds with another message (the
   first group to name the id was refused). Usually there are none.

No deadlock between claim transactions: the only locks one takes waiting are
those of its one insert, taken in id order; the fix-ups touch only rows it
inserted itself. Savepoints per group were not used: they cost round trips
per group, and locks taken group by group are not in one order across the
transaction, so two transactions could deadlock. A deadlock against another
statement (retention) is retried like any write.

Deadlocks and serialization failures are retried a few times. The message
body is its wire encoding (bytea), so reads return exactly what was published.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from uuid import UUID

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the PostgreSQL store needs asyncpg: pip install squadbus[postgres]") from exc

from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError, BackendTimeout, Closed, ConfigError, ConnectionLost
from squadbus.store import _common as c
from squadbus.store import _dead_letters_sql as dl
from squadbus.store import _listing_postgres
from squadbus.store import _postgres_sql as q
from squadbus.store.base import (
    AgentPage,
    AgentQuery,
    ExecutionPage,
    ExecutionQuery,
    ExecutionSnapshot,
    HistoryPage,
    HistoryQuery,
    IdClaim,
    StoredMessage,
)
from squadbus.store.dead_letters import DeadLetter, DeadLetterPage, DeadLetterQuery, DeadLetterState
from squadbus.store.migrations import POSTGRES_MIGRATIONS

_MIGRATION_LOCK = 0x5155_4144  # pg_advisory_xact_lock key: one migrator at a time
_WRITE_ATTEMPTS = 5
_COPY_MIN = 64
_COLUMNS = "seq, stored_at, body, pk"
_OUR_OPTIONS = {"min_size": int, "max_size": int, "command_timeout": float, "connect_timeout": float,
                "parallel_writes": int}


class _RetryWrite(Exception):
    """A concurrent writer got in between; the transaction must run again."""


class _Duplicates(Exception):
    """The fast path met stored ids; roll back and take the careful path."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PostgresSettings:
    """Settings of the PostgreSQL store, from ``postgresql://user@host:port/db?max_size=10``.

    ``min_size``/``max_size`` bound the pool; ``command_timeout`` and
    ``connect_timeout`` (seconds) bound each statement and each connect.
    ``parallel_writes`` (default 1) is how many transactions a db-writer on
    this store keeps writing at once, each on its own connection (parts of a
    batch split by execution, see :mod:`squadbus.workers.db_writer`).
    Other query parameters go to the server (libpq style) unchanged.
    """

    dsn: str
    min_size: int = 1
    max_size: int = 10
    command_timeout: float = 30.0
    connect_timeout: float = 10.0
    parallel_writes: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_size <= self.max_size or self.max_size < 1:
            raise ConfigError("need 0 <= min_size <= max_size and max_size >= 1")
        if self.parallel_writes < 1:
            raise ConfigError("parallel_writes must be >= 1")
        if self.command_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("timeouts must be positive")

    @classmethod
    def from_url(cls, url: str) -> PostgresSettings:
        """Parse ``postgresql://``, ``postgres://`` or ``postgresql+asyncpg://`` URLs."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres", "postgresql+asyncpg"):
            raise ConfigError(f"not a PostgreSQL store URL: {url!r}")
        ours: dict[str, Any] = {}
        rest: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query):
            if key in _OUR_OPTIONS:
                try:
                    ours[key] = _OUR_OPTIONS[key](value)
                except ValueError as exc:
                    raise ConfigError(f"{key}={value!r} in the store URL is not a number") from exc
            else:
                rest.append((key, value))
        dsn = urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), ""))
        return cls(dsn=dsn, **ours)


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Map asyncpg and socket errors to the squadbus tree."""
    try:
        yield
    except (asyncpg.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError) as exc:
        raise ConnectionLost(f"PostgreSQL {what}: {exc}") from exc
    except asyncpg.exceptions.QueryCanceledError as exc:
        raise BackendTimeout(f"PostgreSQL {what}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise BackendError(f"PostgreSQL {what}: {exc}") from exc
    except asyncpg.InterfaceError as exc:
        # "connection is closed", "cannot perform operation: another operation is in progress", ...
        raise ConnectionLost(f"PostgreSQL {what}: {exc}") from exc
    except TimeoutError as exc:
        raise BackendTimeout(f"PostgreSQL {what}: no answer in time") from exc
    except OSError as exc:
        raise ConnectionLost(f"PostgreSQL {what}: {exc}") from exc


class PostgresStore:
    """A ``HistoryStore``, ``ClaimsIdGroups``, ``ListsExecutions`` and ``KeepsDeadLetters`` on PostgreSQL
    (see the module docstring). ``parallel_writes`` comes from the settings (the db-writer reads it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.settings = PostgresSettings.from_url(url)
        self.parallel_writes = self.settings.parallel_writes
        self._pool: asyncpg.Pool | None = None
        self._open_lock = asyncio.Lock()
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the pool and migrate. Idempotent; raises ConnectionLost when unreachable."""
        async with self._open_lock:
            if self._closed:
                raise Closed("store is closed")
            if self._pool is not None:
                return
            s = self.settings
            with _translate("open"):
                pool = await asyncpg.create_pool(
                    s.dsn, min_size=s.min_size, max_size=s.max_size, command_timeout=s.command_timeout,
                    timeout=s.connect_timeout,
                )
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await self._migrate(conn)
                except BaseException:
                    await pool.close()
                    raise
            self._pool = pool

    @staticmethod
    async def _migrate(conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        for version, statements in POSTGRES_MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)

    async def close(self) -> None:
        """Close the pool (waits up to ``command_timeout`` for queries in flight). Idempotent."""
        async with self._open_lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.settings.command_timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _the_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise Closed("store is closed" if self._closed else "store is not open: call open() first")
        return self._pool

    # ---- writing -----------------------------------------------------------------------------

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        """Store ``messages`` in one transaction, idempotently (see HistoryStore.write)."""
        if not messages:
            return []
        unique = c.unique_by_id(messages)
        bodies = {m.id: c.encode_body(m) for m in unique}
        pool = self._the_pool()
        with _translate("write"):
            careful = False
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        if careful:
                            stored = await self._careful_tx(conn, unique, bodies)
                        elif len(unique) >= _COPY_MIN:
                            stored = await self._copy_tx(conn, unique, bodies)
                        else:
                            stored = await self._fast_tx(conn, unique, bodies)
                    break
                except (_Duplicates, asyncpg.exceptions.UniqueViolationError):
                    careful = True
                except (_RetryWrite, asyncpg.exceptions.TransactionRollbackError) as exc:
                    careful = True
                    if attempt == _WRITE_ATTEMPTS:
                        raise BackendError(f"PostgreSQL write: gave up after {attempt} conflicting attempts") from exc
                    await asyncio.sleep(0.01 * attempt)
            else:
                raise BackendError("PostgreSQL write: gave up after repeated conflicts")
        return [stored[m.id] for m in messages]

    @staticmethod
    async def _copy_tx(
        conn: asyncpg.Connection, unique: list[Message], bodies: dict[UUID, bytes]
    ) -> dict[UUID, StoredMessage]:
        exec_keys = c.exec_keys(unique)
        counts: dict[str, int] = {}
        for key in exec_keys:
            counts[key] = counts.get(key, 0) + 1
        keys = sorted(counts)
        # Lock the counters and move them past the batch in one statement (no second UPDATE round trip);
        # a COPY that fails rolls the counters back with it.
        counters = await conn.fetch(q.RESERVE_SEQS, keys, [counts[k] for k in keys])
        last = {row[0]: int(row[1]) - counts[row[0]] for row in counters}
        stored_at: datetime = counters[0][2]
        seqs = []
        for key in exec_keys:  # c.assign_seqs without a second exec_key per message
            seq = last[key] = last[key] + 1
            seqs.append(seq)
        await conn.copy_records_to_table(
            "messages",
            columns=q.COPY_COLUMNS,
            records=[
                (m.id, m.task_execution_id, seq, m.sender_id, m.recipient_id, c.index_text(m.message_type),
                 m.created_at, stored_at, bodies[m.id])
                for m, seq in zip(unique, seqs, strict=True)
            ],
        )
        return {
            m.id: StoredMessage(seq=seq, stored_at=stored_at, message=m) for m, seq in zip(unique, seqs, strict=True)
        }

    @staticmethod
    async def _fast_tx(
        conn: asyncpg.Connection, unique: list[Message], bodies: dict[UUID, bytes]
    ) -> dict[UUID, StoredMessage]:
        rows = await conn.fetch(
            q.FAST_WRITE,
            [m.id for m in unique],
            [m.task_execution_id for m in unique],
            [m.sender_id for m in unique],
            [m.recipient_id for m in unique],
            [c.index_text(m.message_type) for m in unique],
            [m.created_at for m in unique],
            [bodies[m.id] for m in unique],
        )
        if len(rows) != len(unique):
            raise _Duplicates
        by_id = {m.id: m for m in unique}
        # asyncpg's UUID hashes and compares equal to uuid.UUID: look up without converting.
        return {
            message.id: StoredMessage(seq=seq, stored_at=stored_at, message=message)
            for message, seq, stored_at in ((by_id[raw_id], seq, stored_at) for raw_id, seq, stored_at in rows)
        }

    @staticmethod
    async def _careful_tx(
        conn: asyncpg.Connection, unique: list[Message], bodies: dict[UUID, bytes]
    ) -> dict[UUID, StoredMessage]:
        keys = sorted({c.exec_key(m) for m in unique})
        last = {row[0]: int(row[1]) for row in await conn.fetch(q.LOCK_COUNTERS, keys)}
        by_id = {m.id: m for m in unique}
        stored: dict[UUID, StoredMessage] = {}
        for raw_id, seq, stored_at, body in await conn.fetch(q.EXISTING, list(by_id)):
            message_id = UUID(bytes=raw_id.bytes)
            stored[message_id] = c.existing_row(int(seq), stored_at, body, by_id[message_id])
        new = [m for m in unique if m.id not in stored]
        if not new:
            return stored
        seqs = c.assign_seqs(new, last)
        rows = await conn.fetch(
            q.INSERT,
            [m.id for m in new],
            [m.task_execution_id for m in new],
            seqs,
            [m.sender_id for m in new],
            [m.recipient_id for m in new],
            [c.index_text(m.message_type) for m in new],
            [m.created_at for m in new],
            [bodies[m.id] for m in new],
        )
        if len(rows) != len(new):
            raise _RetryWrite
        stored_at = rows[0][1]
        touched = sorted({c.exec_key(m) for m in new})
        await conn.execute(q.SAVE_COUNTERS, touched, [last[k] for k in touched], stored_at)
        for m, seq in zip(new, seqs, strict=True):
            stored[m.id] = StoredMessage(seq=seq, stored_at=stored_at, message=m)
        return stored

    async def claim(self, claims: Sequence[IdClaim]) -> list[IdClaim]:
        """Claim each id for its message, all or nothing (see ClaimsIds)."""
        [holders] = await self.claim_groups([claims])
        return holders

    async def claim_groups(self, groups: Sequence[Sequence[IdClaim]]) -> list[list[IdClaim]]:
        """Decide each group of claims on its own in one transaction (see ClaimsIdGroups and the module docstring)."""
        first: dict[UUID, IdClaim] = {}
        for group in groups:
            for item in group:
                first.setdefault(item.id, item)
        if not first:
            return [[] for _ in groups]
        ids = list(first)
        pool = self._the_pool()
        with _translate("claim"):
            for attempt in range(1, _WRITE_ATTEMPTS + 1):
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        return await self._claim_groups(conn, groups, first, ids)
                except _RetryWrite:
                    if attempt == _WRITE_ATTEMPTS:
                        raise BackendError(f"PostgreSQL claim: claims removed while read {attempt} times") from None
                except asyncpg.exceptions.TransactionRollbackError as exc:
                    if attempt == _WRITE_ATTEMPTS:
                        raise BackendError(f"PostgreSQL claim: gave up after {attempt} conflicting attempts") from exc
                    await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _claim_groups(
        conn: asyncpg.Connection, groups: Sequence[Sequence[IdClaim]], first: dict[UUID, IdClaim], ids: list[UUID]
    ) -> list[list[IdClaim]]:
        """Steps 1-4 of the module docstring inside the caller's transaction."""
        rows = await conn.fetch(
            q.CLAIM, ids, [c.index_text(w.sender_id) for w in first.values()], [w.fingerprint for w in first.values()]
        )
        inserted = {UUID(bytes=row[0].bytes) for row in rows}
        held: dict[UUID, IdClaim] = {}
        for raw_id, sender_id, fingerprint in await conn.fetch(q.CLAIMS_HELD, ids):
            ident = UUID(bytes=raw_id.bytes)
            if ident not in inserted:
                held[ident] = IdClaim(ident, sender_id, bytes(fingerprint))
        if len(held) + len(inserted) != len(ids):
            raise _RetryWrite  # a claim that kept ours out was removed (retention) before the read
        results, recorded = c.decide_claim_groups(groups, held)
        unwanted = [i for i in inserted if i not in recorded]
        if unwanted:
            await conn.execute(q.UNCLAIM, unwanted)
        changed = [w for i, w in recorded.items() if w != first[i]]
        if changed:
            await conn.execute(q.RECLAIM, [w.id for w in changed], [c.index_text(w.sender_id) for w in changed],
                               [w.fingerprint for w in changed])
        return results

    # ---- reading -----------------------------------------------------------------------------

    @staticmethod
    def _rows(rows: Sequence[Any]) -> list[StoredMessage]:
        out: list[StoredMessage] = []
        for seq, stored_at, body, pk in rows:
            item = c.decode_row(int(seq), stored_at, body, f"pk={pk}", int(pk))
            if item is not None:
                out.append(item)
        return out

    async def _fetch(self, what: str, sql: str, *args: Any) -> list[Any]:
        pool = self._the_pool()
        with _translate(what):
            return list(await pool.fetch(sql, *args))

    async def get(self, message_id: UUID) -> StoredMessage | None:
        """The stored message with this id, or None."""
        rows = await self._fetch("get", f"SELECT {_COLUMNS} FROM messages WHERE id = $1", message_id)
        items = self._rows(rows)
        return items[0] if items else None

    async def query(self, q: HistoryQuery) -> HistoryPage:
        """One page of messages matching ``q``, in stored order."""
        q.validate()
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if q.cursor is not None:
            where.append(f"pk > {arg(c.decode_cursor(q.cursor))}")
        if q.task_execution_id is not None:
            where.append(f"task_execution_id = {arg(q.task_execution_id)}")
        if q.agent_id is not None:
            agent = arg(c.index_text(q.agent_id))
            where.append(f"(sender_id = {agent} OR recipient_id = {agent})")
        if q.message_type is not None:
            where.append(f"message_type = {arg(c.index_text(q.message_type))}")
        if q.since is not None:
            where.append(f"created_at >= {arg(q.since)}")
        if q.until is not None:
            where.append(f"created_at < {arg(q.until)}")
        limit, cut, more = q.limit, None, False
        if q.max_bytes is not None:
            # sizes first (octet_length reads a TOASTed body's header only), then only the bodies that fit
            sizes = await self._select("query", "pk, octet_length(body)", where, args, "pk", limit + 1)
            if not sizes:
                return HistoryPage(items=[], next_cursor=None)
            limit = c.fitting([size for _, size in sizes[:limit]], q.max_bytes)
            cut, more = int(sizes[limit - 1][0]), len(sizes) > limit
            where = [*where, f"pk <= {arg(cut)}"]
        rows = await self._select("query", _COLUMNS, where, args, "pk", limit + 1)
        more = more or len(rows) > limit
        rows = rows[:limit]
        last = int(rows[-1][3]) if rows else cut
        next_cursor = c.encode_cursor(last) if more and last is not None else None
        return HistoryPage(items=self._rows(rows), next_cursor=next_cursor)

    async def _select(
        self, what: str, columns: str, where: list[str], args: list[Any], order: str, limit: int
    ) -> list[Any]:
        sql = f"SELECT {columns} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return await self._fetch(what, f"{sql} ORDER BY {order} LIMIT ${len(args) + 1}", *args, limit)

    async def after(
        self, task_execution_id: UUID, after_seq: int, limit: int = 1000, *, max_bytes: int | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` rows (and ``max_bytes`` of bodies) of one execution with ``seq > after_seq``, by seq."""
        if limit < 1:
            return []
        where = ["task_execution_id = $1", "seq > $2"]
        args: list[Any] = [task_execution_id, after_seq]
        if max_bytes is not None:
            sizes = await self._select("after", "seq, octet_length(body)", where, args, "seq", limit)
            if not sizes:
                return []
            limit = c.fitting([size for _, size in sizes], max_bytes)
            where.append("seq <= $3")
            args.append(int(sizes[limit - 1][0]))
        return self._rows(await self._select("after", _COLUMNS, where, args, "seq", limit))

    async def snapshot(self, task_execution_id: UUID) -> ExecutionSnapshot:
        """Counts, seq bounds and agents of one execution as currently retained."""
        [stats] = await self._fetch(
            "snapshot",
            "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0), max(created_at)"
            " FROM messages WHERE task_execution_id = $1",
            task_execution_id,
        )
        agents = await self._fetch(
            "snapshot",
            "SELECT sender_id FROM messages WHERE task_execution_id = $1"
            " UNION SELECT recipient_id FROM messages WHERE task_execution_id = $1 AND recipient_id IS NOT NULL",
            task_execution_id,
        )
        count, first, last, last_at = stats
        return ExecutionSnapshot(
            task_execution_id=task_execution_id,
            message_count=int(count),
            first_seq=int(first),
            last_seq=int(last),
            agents=c.sorted_agents(row[0] for row in agents),
            last_message_at=last_at,
        )

    async def list_executions(self, q: ExecutionQuery) -> ExecutionPage:
        """One page of executions, newest activity first (see ListsExecutions)."""

        async def fetch(sql: str, *args: Any) -> list[Any]:
            return await self._fetch("list_executions", sql, *args)

        return await _listing_postgres.list_executions(fetch, q)

    async def list_agents(self, q: AgentQuery) -> AgentPage:
        """One page of agents by id (see ListsExecutions)."""

        async def fetch(sql: str, *args: Any) -> list[Any]:
            return await self._fetch("list_agents", sql, *args)

        return await _listing_postgres.list_agents(fetch, q)

    # ---- dead letters ------------------------------------------------------------------------

    async def _dl_read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return await self._fetch("dead letters", sql, *params)

    async def _dl_change(self, sql: str, params: Sequence[Any]) -> int:
        pool = self._the_pool()
        with _translate("dead letters"):
            status = await pool.execute(sql, *params)
        return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 1", "UPDATE 1"

    async def keep_dead_letters(self, messages: Sequence[Message]) -> int:
        """Keep dead letters once per id (see KeepsDeadLetters)."""
        return await dl.keep(dl.POSTGRES, self._dl_change, messages)

    async def get_dead_letter(self, dead_letter_id: UUID) -> DeadLetter | None:
        """The kept dead letter with this id, or None."""
        return await dl.get(dl.POSTGRES, self._dl_read, dead_letter_id)

    async def list_dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of kept dead letters, newest first."""
        return await dl.page(dl.POSTGRES, self._dl_read, q)

    async def settle_dead_letter(self, dead_letter_id: UUID, state: DeadLetterState, *, by: str,
                                 redriven_as: UUID | None = None) -> bool:
        """Move a ``dead`` row to ``state`` (compare-and-set)."""
        return await dl.settle(dl.POSTGRES, self._dl_change, dead_letter_id, state, by, redriven_as)

    async def reopen_dead_letter(self, dead_letter_id: UUID, redriven_as: UUID) -> bool:
        """Put a row whose re-drive was not published back to ``dead``."""
        return await dl.reopen(dl.POSTGRES, self._dl_change, dead_letter_id, redriven_as)

    async def dead_letter_counts(self, since: datetime) -> dict[str, int]:
        """Dead letters created at or after ``since``, by group."""
        return await dl.counts(dl.POSTGRES, self._dl_read, since)

    # ---- maintenance -------------------------------------------------------------------------

    async def delete_older_than(self, cutoff: datetime) -> int:
        """Delete rows stored before ``cutoff``, in chunks so no transaction holds locks long."""
        if cutoff.tzinfo is None:
            raise ConfigError("cutoff must be timezone-aware")
        pool = self._the_pool()
        deleted = 0
        with _translate("delete_older_than"):
            while True:
                status = await pool.execute(
                    "DELETE FROM messages WHERE pk IN"
                    " (SELECT pk FROM messages WHERE stored_at < $1 ORDER BY stored_at LIMIT 10000)",
                    cutoff,
                )
                count = int(status.rsplit(" ", 1)[-1])
                deleted += count
                if count == 0:
                    break
            # every row of an execution last active before the cutoff is gone: it leaves the list
            await pool.execute(q.RETIRE_EXECUTIONS, cutoff)
            await pool.execute("DELETE FROM dead_letters WHERE stored_at < $1", cutoff)  # kept with the history
            while True:
                status = await pool.execute(
                    "DELETE FROM id_claims WHERE id IN"
                    " (SELECT id FROM id_claims WHERE claimed_at < $1 ORDER BY claimed_at LIMIT 10000)",
                    cutoff,
                )
                if status.rsplit(" ", 1)[-1] == "0":
                    return deleted

    async def ping(self) -> None:
        """Run ``SELECT 1``; raises a BackendError subclass when the server cannot answer."""
        await self._fetch("ping", "SELECT 1")
