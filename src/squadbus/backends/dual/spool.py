"""A local durable spool for the secondary of ``dual://`` (``secondary=spool``).

While the secondary is down, what the primary stored is appended to a SQLite
file and sent to the secondary in the order it was spooled once it answers
again. The spool is the standard library's ``sqlite3`` (one process, one
file, WAL, ``synchronous=FULL``: an appended message survives a crash of the
process and of the machine); a backend may not import the history store.

One process per spool file: the file is locked (``flock``) while open, and a
second opener gets a :class:`ConfigError` naming it, because two drainers of
one spool would send every message twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

from squadbus.core import envelope
from squadbus.core.envelope import Message
from squadbus.core.errors import ConfigError

_R = TypeVar("_R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spooled (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS refused (seq INTEGER PRIMARY KEY, body BLOB NOT NULL, reason TEXT NOT NULL);
"""


class Spool:
    """An ordered, durable queue of messages on disk; every call runs on one private thread, in order."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock_file: IO[bytes] | None = None
        # One thread: SQLite calls stay off the event loop and run in call order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="squadbus-spool")
        self.depth = 0
        self.refused = 0

    async def open(self) -> None:
        """Open (creating) the file and take its lock; ConfigError if another process holds it."""
        await self._run(self._open)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(f"{self.path}.lock", "wb")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock_file.close()
            raise ConfigError(f"the dual-write spool {self.path} is in use by another process "
                              "(give each process its own spool=)") from exc
        self._lock_file = lock_file
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db
        self.depth = db.execute("SELECT count(*) FROM spooled").fetchone()[0]
        self.refused = db.execute("SELECT count(*) FROM refused").fetchone()[0]

    async def close(self) -> None:
        """Close the file and release its lock (idempotent); what is spooled stays for the next open."""
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def append(self, messages: Sequence[Message]) -> None:
        """Append ``messages`` durably, in order; returns once they are on disk."""
        bodies = [(envelope.encode(m),) for m in messages]
        await self._run(self._append, bodies)

    def _append(self, bodies: list[tuple[bytes]]) -> None:
        db = self._require()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO spooled (body) VALUES (?)", bodies)
        self.depth += len(bodies)

    async def head(self, limit: int) -> list[tuple[int, Message]]:
        """Up to ``limit`` of the oldest spooled messages, with their spool sequence numbers."""
        rows = await self._run(self._head, limit)
        return [(seq, envelope.decode(body)) for seq, body in rows]

    def _head(self, limit: int) -> list[tuple[int, bytes]]:
        return self._require().execute("SELECT seq, body FROM spooled ORDER BY seq LIMIT ?", (limit,)).fetchall()

    async def remove_through(self, seq: int) -> None:
        """Forget every message up to ``seq`` (the secondary stored them)."""
        await self._run(self._remove_through, seq)

    def _remove_through(self, seq: int) -> None:
        db = self._require()
        with db:
            removed = db.execute("DELETE FROM spooled WHERE seq <= ?", (seq,)).rowcount
        self.depth -= removed

    async def refuse(self, seq: int, reason: str) -> None:
        """Move one message the secondary will never take (say, too large there) aside, with the reason."""
        await self._run(self._refuse, seq, reason)

    def _refuse(self, seq: int, reason: str) -> None:
        db = self._require()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO refused SELECT seq, body, ? FROM spooled WHERE seq = ?", (reason, seq))
            db.execute("DELETE FROM spooled WHERE seq = ?", (seq,))
        self.depth -= 1
        self.refused += 1

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise ConfigError(f"the dual-write spool {self.path} is not open")
        return self._db

    async def _run(self, fn: Callable[..., _R], *args: object) -> _R:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)


def default_path(data_dir: str, secondary_url: str) -> Path:
    """``<data_dir>/dual-spool-<digest of the secondary URL>.db``: stable across restarts of one deployment."""
    digest = hashlib.sha256(secondary_url.encode()).hexdigest()[:12]
    return Path(data_dir) / f"dual-spool-{digest}.db"
