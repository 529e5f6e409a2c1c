"""The audit-logger worker: every message on the bus, appended as one JSON line to a file.

Group ``audit-logger`` reads ``agent.>`` (messages, replies and dead letters).
Deliveries are written in batches and acked only after the batch is written,
flushed and (by default) fsynced, so a crash loses nothing: at worst a line
is written twice (at-least-once; lines carry the message ``id``).

Rotation is by size: before a write would push the file past ``max_bytes``,
it is renamed to ``<path>.<UTC timestamp>`` and a new file is started. Old
files are kept unless ``max_files`` is set, in which case the oldest rotated
files beyond that number are deleted (and each deletion is logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from squadbus.core.backend import ConsumerOptions, Subscription
from squadbus.core.batching import batched
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.workers.analytics import LATENCY_BUCKETS, Histogram

logger = logging.getLogger("squadbus.workers.audit")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
PATTERN = "agent.>"


class AuditFile:
    """An append-only JSON-lines file with size-based rotation (blocking I/O; call from a thread)."""

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int | None = None,
                 fsync: bool = True) -> None:
        if max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        if max_files is not None and max_files < 1:
            raise ValueError("max_files must be at least 1 (or None to keep every file)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.fsync = fsync
        self.rotations = 0

    def append(self, lines: Sequence[bytes]) -> None:
        """Append ``lines`` (each ending in a newline), rotating first when the file would overflow."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pending = list(lines)
        while pending:
            size = self.path.stat().st_size if self.path.exists() else 0
            chunk: list[bytes] = []
            room = self.max_bytes - size
            for line in pending:
                if chunk and len(line) > room:
                    break
                if not chunk and size > 0 and len(line) > room:
                    break
                chunk.append(line)
                room -= len(line)
            if not chunk:
                self.rotate()
                continue
            with self.path.open("ab") as fh:
                fh.write(b"".join(chunk))
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            pending = pending[len(chunk):]

    def rotate(self) -> Path:
        """Rename the current file aside; returns the new name of the old file."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        n = 0
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.{stamp}-{n}")
        self.path.rename(target)
        self.rotations += 1
        logger.info("audit log rotated to %s", target)
        if self.max_files is not None:
            rotated = sorted(self.path.parent.glob(f"{self.path.name}.*"))
            for old in rotated[: max(0, len(rotated) - self.max_files)]:
                old.unlink()
                logger.warning("audit log %s deleted (max_files=%d)", old, self.max_files)
        return target


_encoder = msgspec.json.Encoder()


def audit_line(message: Message) -> bytes:
    """One JSON line: when it was logged, plus the message exactly as published."""
    record = {"logged_at": datetime.now(UTC).isoformat(), "message": message}
    return _encoder.encode(record) + b"\n"


class AuditLogger:
    """Appends every message on the bus to an :class:`AuditFile` (see module docstring)."""

    name = "audit-logger"

    def __init__(self, bus: Bus, *, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_files: int | None = None, fsync: bool = True, batch_size: int = 500,
                 max_wait: float = 0.05) -> None:
        self.bus = bus
        self.file = AuditFile(path, max_bytes=max_bytes, max_files=max_files, fsync=fsync)
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.written = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        """Seconds per written batch (one handler call covers a batch)."""
        self._sub: Subscription | None = None

    async def _write(self, messages: Sequence[Message]) -> None:
        started = time.perf_counter()
        lines = [audit_line(m) for m in messages]
        await asyncio.to_thread(self.file.append, lines)
        self.written += len(lines)
        self.latency.observe(time.perf_counter() - started)

    async def start(self) -> None:
        """Subscribe as group ``audit-logger`` (idempotent)."""
        if self._sub is None:
            handler = batched(self._write, max_batch=self.batch_size, max_wait=self.max_wait)
            options = ConsumerOptions(max_in_flight=self.batch_size)
            self._sub = await self.bus.subscribe(PATTERN, handler, group=self.name, options=options)

    async def stop(self) -> None:
        """Unsubscribe after in-flight batches are written and acked. Idempotent."""
        sub, self._sub = self._sub, None
        if sub is not None:
            await self.bus.unsubscribe(sub)
