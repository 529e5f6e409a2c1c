"""The SQLite history store (aiosqlite, WAL): the embedded default.

One writer connection serialises write transactions (``BEGIN IMMEDIATE``
takes SQLite's write lock, so several processes on one file are safe too);
reads use a second, read-only connection that WAL lets run beside the
writer. An in-memory database (``:memory:``) has one connection for both.
Timestamps are integer microseconds since the epoch (UTC); the message body
is its wire encoding, so reads return exactly what was published.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

try:
    import aiosqlite
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the SQLite store needs aiosqlite: pip install squadbus[sqlite]") from exc

from squadbus.core.backoff import FILE_LOCKED, Backoff
from squadbus.core.envelope import Message, utcnow
from squadbus.core.errors import BackendError, BackendTimeout, Closed, ConfigError, ConnectionLost
from squadbus.store import _common as c
from squadbus.store import _dead_letters_sql as dl
from squadbus.store import _listing_sqlite
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
from squadbus.store.migrations import SQLITE_MIGRATIONS

_CHUNK = 500  # ids per IN (...) list, well under SQLITE_MAX_VARIABLE_NUMBER
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
_COLUMNS = "seq, stored_at, body, pk"
_T = TypeVar("_T")
# The writer's page cache and WAL size, neither a durability setting (a commit is as durable as before):
# the default 2 MiB cache re-reads index pages from the file on every batch and the default
# 1000-page WAL checkpoints (two fsyncs, the pages copied back) every ~3 batches of 500 x 1 KiB.
# These two cut the store's CPU per row from 34-38 us to 27-28 (50,000 x 1 KiB, batches of 500).
_WRITER_CACHE_KIB = 32 * 1024
_WAL_CHECKPOINT_PAGES = 4000


@dataclass(frozen=True, kw_only=True, slots=True)
class SqliteSettings:
    """Settings of the SQLite store, from ``sqlite+aiosqlite:///PATH?synchronous=NORMAL&busy_timeout=10``.

    ``synchronous=NORMAL`` (default) with WAL survives a process crash but may
    lose the last commits on power loss; use ``FULL`` to survive that too.
    ``busy_timeout`` is how long (seconds) to wait for another writer's lock.
    """

    path: str
    synchronous: str = "NORMAL"
    busy_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("SQLite store URL has no path (use sqlite+aiosqlite:///./squadbus.db)")
        if self.synchronous.upper() not in _SYNC_MODES:
            raise ConfigError(f"synchronous must be one of {', '.join(_SYNC_MODES)}")
        if self.busy_timeout <= 0:
            raise ConfigError("busy_timeout must be positive")

    @property
    def in_memory(self) -> bool:
        return self.path == ":memory:"

    @classmethod
    def from_url(cls, url: str) -> SqliteSettings:
        """Parse ``sqlite+aiosqlite:///relative.db``, ``...:////abs.db`` or ``...:///:memory:``."""
        parts = urlsplit(url)
        if parts.scheme not in ("sqlite", "sqlite+aiosqlite"):
            raise ConfigError(f"not a SQLite store URL: {url!r}")
        if parts.netloc:
            raise ConfigError(f"SQLite URL {url!r} must have three slashes: sqlite+aiosqlite:///PATH")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"synchronous", "busy_timeout"}
        if unknown:
            raise ConfigError(f"unknown SQLite store option(s): {', '.join(sorted(unknown))}")
        try:
            timeout = float(query.get("busy_timeout", 10.0))
        except ValueError as exc:
            raise ConfigError(f"busy_timeout in {url!r} is not a number") from exc
        return cls(
            path=parts.path[1:], synchronous=query.get("synchronous", "NORMAL").upper(), busy_timeout=timeout
        )


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Map sqlite3 errors to the squadbus tree."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise BackendTimeout(f"SQLite {what}: {exc}") from exc
        if "unable to open" in text or "disk i/o" in text or "readonly" in text:
            raise ConnectionLost(f"SQLite {what}: {exc}") from exc
        raise BackendError(f"SQLite {what}: {exc}") from exc
    except sqlite3.Error as exc:
        raise BackendError(f"SQLite {what}: {exc}") from exc


_NewRow = tuple[bytes, bytes | None, str, str, str | None, str, int, bytes]
"""A message to insert: id, task_execution_id, exec_key, sender, recipient, type, created_at, body."""
_Existing = dict[bytes, tuple[int, int, bytes]]
"""Rows already stored, by id: seq, stored_at, body."""

_INSERT = (
    "INSERT INTO messages (id, task_execution_id, seq, sender_id, recipient_id, message_type, created_at,"
    " stored_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_UPSERT = (
    "INSERT INTO exec_counters (exec_key, last_seq, task_execution_id, last_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (exec_key) DO UPDATE SET last_seq = excluded.last_seq,"
    " task_execution_id = excluded.task_execution_id, last_at = max(coalesce(last_at, 0), excluded.last_at)"
)


async def _on_thread(conn: aiosqlite.Connection, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn(sqlite3_connection, *args)`` on ``conn``'s thread, as aiosqlite runs its own calls.

    aiosqlite has no public way to run a callable there; ``_execute`` and ``_conn`` are what its
    public methods use (the same in 0.19, our lowest, and 0.22). One call per write transaction
    instead of one per statement spares a thread hand-off per statement (each waits for the GIL
    when the loop is busy).
    """
    result: _T = await conn._execute(fn, conn._conn, *args)  # type: ignore[no-untyped-call]
    return result


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _write_batch(conn: sqlite3.Connection, rows: list[_NewRow], now_us: int) -> tuple[_Existing, list[int]]:
    """One write transaction (runs on the connection's thread): the rows already stored, by id, and
    the seqs given to the others, in order.

    ``BEGIN IMMEDIATE`` holds the write lock from the reads to the commit, so the seqs are gap-free.
    The common case stores none of the ids yet, so the batch is inserted at once; when an insert
    is ignored (an id already stored: a redelivery), that attempt is rolled back and the batch is
    written again after reading which ids are stored.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        seqs = _insert(conn, rows, now_us)
        existing: _Existing = {}
        if seqs is None:
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            for chunk in _chunks([row[0] for row in rows], _CHUNK):
                cursor = conn.execute(
                    f"SELECT id, seq, stored_at, body FROM messages WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                existing.update((raw_id, (seq, stored_at, body)) for raw_id, seq, stored_at, body in cursor)
            seqs = _insert(conn, [row for row in rows if row[0] not in existing], now_us)
            if seqs is None:
                # Impossible under BEGIN IMMEDIATE; refuse rather than leave a seq gap.
                raise BackendError("concurrent insert of the same message id; retry the write")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return existing, seqs


def _insert(conn: sqlite3.Connection, rows: list[_NewRow], now_us: int) -> list[int] | None:
    """Insert ``rows`` with the next seqs of their executions and move the counters on: the seqs,
    or None when an id was already stored (its row left as it was, the transaction to roll back)."""
    if not rows:
        return []
    keys = sorted({row[2] for row in rows})
    last: dict[str, int] = {}
    for chunk_keys in _chunks(keys, _CHUNK):
        cursor = conn.execute(
            f"SELECT exec_key, last_seq FROM exec_counters WHERE exec_key IN ({','.join('?' * len(chunk_keys))})",
            chunk_keys,
        )
        last.update(cursor)
    seqs: list[int] = []
    params: list[tuple[Any, ...]] = []
    for message_id, execution, key, sender, recipient, kind, created, body in rows:
        seq = last.get(key, 0) + 1
        last[key] = seq
        seqs.append(seq)
        params.append((message_id, execution, seq, sender, recipient, kind, created, now_us, body))
    before = conn.total_changes
    conn.executemany(_INSERT, params)
    if conn.total_changes - before != len(rows):
        return None
    conn.executemany(_UPSERT, [(key, last[key], UUID(key).bytes if key else None, now_us) for key in keys])
    return seqs


class SqliteStore:
    """A ``HistoryStore``, ``ClaimsIdGroups``, ``ListsExecutions`` and ``KeepsDeadLetters`` on one SQLite file
    (see module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.settings = SqliteSettings.from_url(url)
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._opened = False
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _connect(self, *, readonly: bool) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(
            self.settings.path, isolation_level=None, timeout=self.settings.busy_timeout
        )
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(self.settings.busy_timeout * 1000)}")
            if not self.settings.in_memory:
                await self._enable_wal(conn)
            await conn.execute(f"PRAGMA synchronous = {self.settings.synchronous}")
            if readonly:
                await conn.execute("PRAGMA query_only = 1")
            else:
                await conn.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
                await conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_CHECKPOINT_PAGES}")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _enable_wal(self, conn: aiosqlite.Connection) -> None:
        """``PRAGMA journal_mode = WAL``, retried while another connection holds the file.

        Leaving the rollback journal needs an exclusive lock, and when two connections would
        deadlock over it SQLite answers "database is locked" at once instead of waiting
        ``busy_timeout``; several processes opening one file together hit that.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.busy_timeout
        backoff = Backoff(FILE_LOCKED)
        while True:
            try:
                await conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                pause = backoff.next()
                if "locked" not in str(exc).lower() or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)

    async def open(self) -> None:
        """Open the database file (created if missing), enable WAL and migrate. Idempotent."""
        if self._closed:
            raise Closed("store is closed")
        if self._opened:
            return
        with _translate("open"):
            self._writer = await self._connect(readonly=False)
            try:
                await self._migrate(self._writer)
                self._reader = self._writer if self.settings.in_memory else await self._connect(readonly=True)
            except BaseException:
                await self._writer.close()
                self._writer = None
                raise
        self._opened = True

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute("BEGIN IMMEDIATE")
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            )
            rows = await conn.execute_fetchall("SELECT coalesce(max(version), 0) FROM schema_version")
            current = int(next(iter(rows))[0])
            for version, statements in SQLITE_MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, c.to_micros(utcnow()))
                )
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close both connections. Idempotent."""
        self._closed = True
        self._opened = False
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        async with self._write_lock:
            if reader is not None and reader is not writer:
                await reader.close()
            if writer is not None:
                await writer.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _conns(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        if self._writer is None or self._reader is None:
            raise Closed("store is closed" if self._closed else "store is not open: call open() first")
        return self._writer, self._reader

    async def _read(self, sql: str, params: Sequence[Any]) -> list[Any]:
        writer, reader = self._conns()
        if reader is writer:
            # One connection: do not read another coroutine's open write transaction.
            async with self._write_lock:
                return list(await reader.execute_fetchall(sql, params))
        return list(await reader.execute_fetchall(sql, params))

    # ---- writing -----------------------------------------------------------------------------

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        """Store ``messages`` in one transaction, idempotently (see HistoryStore.write).

        The whole transaction runs as one call on the connection's thread (see ``_write_batch``):
        cancelled while it runs, the transaction still commits or rolls back whole on that thread,
        and writing the batch again is safe (idempotent).
        """
        if not messages:
            return []
        unique = c.unique_by_id(messages)
        rows: list[_NewRow] = []
        for m, key in zip(unique, c.exec_keys(unique), strict=True):
            execution = m.task_execution_id
            rows.append((
                m.id.bytes, None if execution is None else execution.bytes, key, m.sender_id, m.recipient_id,
                c.index_text(m.message_type), c.to_micros(m.created_at), c.encode_body(m),
            ))
        writer, _ = self._conns()
        with _translate("write"):
            async with self._write_lock:
                now = utcnow()
                existing, seqs = await _on_thread(writer, _write_batch, rows, c.to_micros(now))
        stored: dict[UUID, StoredMessage] = {}
        fresh = iter(seqs)
        for m in unique:
            row = existing.get(m.id.bytes)
            if row is None:
                stored[m.id] = StoredMessage(seq=next(fresh), stored_at=now, message=m)
            else:
                seq, stored_at, body = row
                stored[m.id] = c.existing_row(seq, c.from_micros(stored_at), body, m)
        return [stored[m.id] for m in messages]

    async def claim(self, claims: Sequence[IdClaim]) -> list[IdClaim]:
        """Claim each id for its message, all or nothing (see ClaimsIds)."""
        [holders] = await self.claim_groups([claims])
        return holders

    async def claim_groups(self, groups: Sequence[Sequence[IdClaim]]) -> list[list[IdClaim]]:
        """Decide each group of claims on its own in one transaction (see ClaimsIdGroups).

        Check, then insert: ``BEGIN IMMEDIATE`` holds SQLite's write lock from
        the read of the claims already held to the commit, so nothing can
        claim in between and deciding the groups in Python is atomic.
        """
        ids = list(dict.fromkeys(item.id for group in groups for item in group))
        if not ids:
            return [[] for _ in groups]
        writer, _ = self._conns()
        held: dict[UUID, IdClaim] = {}
        with _translate("claim"):
            async with self._write_lock:
                await writer.execute("BEGIN IMMEDIATE")
                try:
                    for start in range(0, len(ids), _CHUNK):
                        chunk = [ident.bytes for ident in ids[start:start + _CHUNK]]
                        rows = await writer.execute_fetchall(
                            "SELECT id, sender_id, fingerprint FROM id_claims"
                            f" WHERE id IN ({','.join('?' * len(chunk))})",
                            chunk,
                        )
                        for raw_id, sender_id, fingerprint in rows:
                            ident = UUID(bytes=raw_id)
                            held[ident] = IdClaim(ident, sender_id, bytes(fingerprint))
                    results, recorded = c.decide_claim_groups(groups, held)
                    if recorded:
                        now_us = c.to_micros(utcnow())
                        await writer.executemany(
                            "INSERT INTO id_claims (id, sender_id, fingerprint, claimed_at) VALUES (?, ?, ?, ?)",
                            [(i.bytes, w.sender_id, w.fingerprint, now_us) for i, w in recorded.items()],
                        )
                        await writer.execute("COMMIT")
                    else:
                        await writer.execute("ROLLBACK")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        await writer.execute("ROLLBACK")
                    raise
        return results

    # ---- reading -----------------------------------------------------------------------------

    def _rows(self, rows: list[Any]) -> list[StoredMessage]:
        out: list[StoredMessage] = []
        for seq, stored_at, body, pk in rows:
            item = c.decode_row(seq, c.from_micros(stored_at), body, f"pk={pk}", int(pk))
            if item is not None:
                out.append(item)
        return out

    async def get(self, message_id: UUID) -> StoredMessage | None:
        """The stored message with this id, or None."""
        with _translate("get"):
            rows = await self._read(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (message_id.bytes,))
        items = self._rows(rows)
        return items[0] if items else None

    async def query(self, q: HistoryQuery) -> HistoryPage:
        """One page of messages matching ``q``, in stored order."""
        q.validate()
        where: list[str] = []
        params: list[Any] = []
        if q.cursor is not None:
            where.append("pk > ?")
            params.append(c.decode_cursor(q.cursor))
        if q.task_execution_id is not None:
            where.append("task_execution_id = ?")
            params.append(q.task_execution_id.bytes)
        if q.agent_id is not None:
            where.append("(sender_id = ? OR recipient_id = ?)")
            params += [q.agent_id, q.agent_id]
        if q.message_type is not None:
            where.append("message_type = ?")
            params.append(c.index_text(q.message_type))
        if q.since is not None:
            where.append("created_at >= ?")
            params.append(c.to_micros(q.since))
        if q.until is not None:
            where.append("created_at < ?")
            params.append(c.to_micros(q.until))
        limit, cut, more = q.limit, None, False
        if q.max_bytes is not None:
            # sizes first (length() of a blob does not read it), then only the bodies that fit
            sizes = await self._read_rows("query", "pk, length(body)", where, params, "pk", limit + 1)
            if not sizes:
                return HistoryPage(items=[], next_cursor=None)
            limit = c.fitting([size for _, size in sizes[:limit]], q.max_bytes)
            cut, more = int(sizes[limit - 1][0]), len(sizes) > limit
            where, params = [*where, "pk <= ?"], [*params, cut]
        rows = await self._read_rows("query", _COLUMNS, where, params, "pk", limit + 1)
        more = more or len(rows) > limit
        rows = rows[:limit]
        last = int(rows[-1][3]) if rows else cut
        next_cursor = c.encode_cursor(last) if more and last is not None else None
        return HistoryPage(items=self._rows(rows), next_cursor=next_cursor)

    async def _read_rows(
        self, what: str, columns: str, where: list[str], params: list[Any], order: str, limit: int
    ) -> list[Any]:
        sql = f"SELECT {columns} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with _translate(what):
            return await self._read(f"{sql} ORDER BY {order} LIMIT ?", [*params, limit])

    async def after(
        self, task_execution_id: UUID, after_seq: int, limit: int = 1000, *, max_bytes: int | None = None
    ) -> list[StoredMessage]:
        """Up to ``limit`` rows (and ``max_bytes`` of bodies) of one execution with ``seq > after_seq``, by seq."""
        if limit < 1:
            return []
        where = ["task_execution_id = ?", "seq > ?"]
        params: list[Any] = [task_execution_id.bytes, after_seq]
        if max_bytes is not None:
            sizes = await self._read_rows("after", "seq, length(body)", where, params, "seq", limit)
            if not sizes:
                return []
            limit = c.fitting([size for _, size in sizes], max_bytes)
            where.append("seq <= ?")
            params.append(sizes[limit - 1][0])
        return self._rows(await self._read_rows("after", _COLUMNS, where, params, "seq", limit))

    async def snapshot(self, task_execution_id: UUID) -> ExecutionSnapshot:
        """Counts, seq bounds and agents of one execution as currently retained."""
        key = task_execution_id.bytes
        with _translate("snapshot"):
            stats = await self._read(
                "SELECT count(*), coalesce(min(seq), 0), coalesce(max(seq), 0), max(created_at)"
                " FROM messages WHERE task_execution_id = ?",
                (key,),
            )
            agents = await self._read(
                "SELECT sender_id FROM messages WHERE task_execution_id = ?"
                " UNION SELECT recipient_id FROM messages WHERE task_execution_id = ? AND recipient_id IS NOT NULL",
                (key, key),
            )
        count, first, last, last_at = stats[0]
        return ExecutionSnapshot(
            task_execution_id=task_execution_id,
            message_count=int(count),
            first_seq=int(first),
            last_seq=int(last),
            agents=c.sorted_agents(row[0] for row in agents),
            last_message_at=None if last_at is None else c.from_micros(int(last_at)),
        )

    async def list_executions(self, q: ExecutionQuery) -> ExecutionPage:
        """One page of executions, newest activity first (see ListsExecutions)."""
        with _translate("list_executions"):
            return await _listing_sqlite.list_executions(self._read, q)

    async def list_agents(self, q: AgentQuery) -> AgentPage:
        """One page of agents by id (see ListsExecutions)."""
        with _translate("list_agents"):
            return await _listing_sqlite.list_agents(self._read, q)

    # ---- dead letters ------------------------------------------------------------------------

    async def _change(self, sql: str, params: Sequence[Any]) -> int:
        writer, _ = self._conns()
        async with self._write_lock:
            cursor = await writer.execute(sql, params)
            return int(cursor.rowcount)

    async def keep_dead_letters(self, messages: Sequence[Message]) -> int:
        """Keep dead letters once per id (see KeepsDeadLetters)."""
        with _translate("keep_dead_letters"):
            return await dl.keep(dl.SQLITE, self._change, messages)

    async def get_dead_letter(self, dead_letter_id: UUID) -> DeadLetter | None:
        """The kept dead letter with this id, or None."""
        with _translate("get_dead_letter"):
            return await dl.get(dl.SQLITE, self._read, dead_letter_id)

    async def list_dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of kept dead letters, newest first."""
        with _translate("list_dead_letters"):
            return await dl.page(dl.SQLITE, self._read, q)

    async def settle_dead_letter(self, dead_letter_id: UUID, state: DeadLetterState, *, by: str,
                                 redriven_as: UUID | None = None) -> bool:
        """Move a ``dead`` row to ``state`` (compare-and-set)."""
        with _translate("settle_dead_letter"):
            return await dl.settle(dl.SQLITE, self._change, dead_letter_id, state, by, redriven_as)

    async def reopen_dead_letter(self, dead_letter_id: UUID, redriven_as: UUID) -> bool:
        """Put a row whose re-drive was not published back to ``dead``."""
        with _translate("reopen_dead_letter"):
            return await dl.reopen(dl.SQLITE, self._change, dead_letter_id, redriven_as)

    async def dead_letter_counts(self, since: datetime) -> dict[str, int]:
        """Dead letters created at or after ``since``, by group."""
        with _translate("dead_letter_counts"):
            return await dl.counts(dl.SQLITE, self._read, since)

    # ---- maintenance -------------------------------------------------------------------------

    async def delete_older_than(self, cutoff: datetime) -> int:
        """Delete rows stored before ``cutoff``, in chunks so writers are not blocked long."""
        if cutoff.tzinfo is None:
            raise ConfigError("cutoff must be timezone-aware")
        writer, _ = self._conns()
        limit = c.to_micros(cutoff)
        deleted = 0
        with _translate("delete_older_than"):
            while True:
                async with self._write_lock:
                    before = writer.total_changes
                    await writer.execute(
                        "DELETE FROM messages WHERE pk IN"
                        " (SELECT pk FROM messages WHERE stored_at < ? ORDER BY stored_at LIMIT 5000)",
                        (limit,),
                    )
                    count = writer.total_changes - before
                deleted += count
                if count == 0:
                    break
            async with self._write_lock:
                # every row of an execution last active before the cutoff is gone: it leaves the list
                await writer.execute(
                    "UPDATE exec_counters SET task_execution_id = NULL"
                    " WHERE task_execution_id IS NOT NULL AND last_at < ?",
                    (limit,),
                )
                await writer.execute("DELETE FROM dead_letters WHERE stored_at < ?", (limit,))  # kept with the history
            while True:
                async with self._write_lock:
                    before = writer.total_changes
                    await writer.execute(
                        "DELETE FROM id_claims WHERE id IN"
                        " (SELECT id FROM id_claims WHERE claimed_at < ? ORDER BY claimed_at LIMIT 5000)",
                        (limit,),
                    )
                    if writer.total_changes == before:
                        return deleted

    async def ping(self) -> None:
        """Run a trivial query; raises a BackendError subclass when the database cannot answer."""
        with _translate("ping"):
            await self._read("SELECT 1", ())
