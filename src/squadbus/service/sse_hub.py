"""Live fan-out of stored messages to SSE viewers, one feed per execution.

The SSE event id is the store's per-execution ``seq``, so viewers are fed from
what the store holds, never straight from the bus:

* a :class:`Feed` exists per execution while it has viewers. It tracks the
  highest ``seq`` it has fanned out and is told about new rows in two ways:
  :meth:`SseHub.offer` hands it rows that were just committed in this process
  (the db-writer's ``on_written`` callback and the HTTP write-through), which
  are fanned out without a store read when they continue the sequence;
  :meth:`SseHub.notify` (from the sse-broadcaster's bus subscription, for rows
  written by another process) makes it read ``store.after(execution, last)``
  once for all its viewers, retrying with backoff until the expected message
  ids are visible. A slow periodic poll is the safety net.
* every viewer has a queue of pre-encoded frames bounded in count and bytes.
  Fan-out never waits: when a viewer's queue is full its frames are dropped
  and it is marked *behind*; the viewer itself then catches up from the store
  (see :class:`ViewerStream`), so a slow viewer never stalls the bus, the
  feed or other viewers, and never misses an event.
* every store read is bounded in bytes (``page_bytes`` of message bodies, at
  least one row) and a replay is sent in chunks of about ``CHUNK_BYTES`` as it
  is read, so what a viewer that stops reading holds is a page, a chunk and
  its queue, however much history it asked for.
* a :class:`Watcher` is a stream of every execution (``GET /v1/events``): it
  reads the store in its global order itself and is only woken by the hub on
  every offer, notify and poll.
* :meth:`SseHub.end_streams` (the server is stopping) ends every stream after
  it has sent what it holds: an open stream would otherwise hold the server's
  graceful shutdown for its whole timeout. Clients resume with ``Last-Event-ID``.

Everything runs on the event loop; there is no lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

import msgspec

from squadbus.core.backoff import STORE_POLL, Backoff
from squadbus.core.tasks import cancel_and_wait
from squadbus.store.base import HistoryStore, StoredMessage

logger = logging.getLogger("squadbus.service.sse")

STORE_PAGE = 1000
CHUNK_BYTES = 64 * 1024
"""Frames are joined into writes of about this size (fewer sends than one per frame)."""
_EXPECT_TTL = 30.0
_BEHIND_RETRY = 0.05

_json = msgspec.json.Encoder()


def message_payload(row: StoredMessage) -> dict[str, object]:
    """The object of a stored message with every field, as the REST API shows it (``MessageOut``).

    Values stay UUIDs and datetimes: the msgspec encoder writes them as strings.
    """
    m = row.message
    return {
        "id": m.id, "subject": m.subject, "sender_id": m.sender_id, "recipient_id": m.recipient_id,
        "domain": m.domain, "content": m.content, "message_type": m.message_type,
        "task_execution_id": m.task_execution_id, "metadata": m.metadata, "headers": m.headers,
        "created_at": m.created_at, "seq": row.seq, "stored_at": row.stored_at,
    }


def message_frame(row: StoredMessage) -> bytes:
    """The SSE frame of one stored message: ``id: <seq>``, ``event: message``, JSON data."""
    data = _json.encode(message_payload(row))
    return b"id: %d\nevent: message\ndata: %s\n\n" % (row.seq, data)


def event_frame(event: str, data: object, *, event_id: int | None = None) -> bytes:
    """An SSE frame of a named event with JSON data (and an id when given)."""
    head = b"" if event_id is None else b"id: %d\n" % event_id
    return head + b"event: %s\ndata: %s\n\n" % (event.encode(), _json.encode(data))


HEARTBEAT_FRAME = b": keepalive\n\n"


@dataclass(slots=True)
class HubStats:
    """Counters of the hub, read by the metrics collector."""

    frames_fanned_out: int = 0
    frames_dropped: int = 0
    store_reads: int = 0
    viewer_catchups: int = 0
    gaps_sent: int = 0


class Viewer:
    """One connected SSE client of one execution: a bounded buffer of frames and a wake-up future.

    The buffer holds at most ``queue_size`` frames and ``max_bytes`` bytes.
    Cheaper than an ``asyncio.Queue`` read with ``wait_for`` (no task and no
    timeout object per frame), which matters with thousands of viewers.
    """

    __slots__ = ("behind", "buffer", "execution", "limit", "max_bytes", "size", "waiter")

    def __init__(self, execution: UUID, queue_size: int, max_bytes: int = 1 << 62) -> None:
        self.execution = execution
        self.limit = queue_size
        self.max_bytes = max_bytes
        self.size = 0
        self.buffer: deque[tuple[int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.behind = False

    def push(self, seq: int, frame: bytes) -> bool:
        """Buffer a frame; False (and marked behind) when the buffer is full."""
        if len(self.buffer) >= self.limit or self.size + len(frame) > self.max_bytes:
            self.behind = True
            self.wake()
            return False
        self.buffer.append((seq, frame))
        self.size += len(frame)
        self.wake()
        return True

    def take(self) -> list[tuple[int, bytes]]:
        """Empty the buffer and return what it held, oldest first."""
        batch = list(self.buffer)
        self.buffer.clear()
        self.size = 0
        return batch

    def wake(self) -> None:
        """Resume the viewer's stream if it is waiting."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait until a frame is buffered or the viewer is behind; False after ``timeout`` seconds."""
        if self.buffer or self.behind:
            return True
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, self.wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self.waiter = None
        return bool(self.buffer) or self.behind


class Watcher:
    """A stream that follows every stored message rather than one execution (``GET /v1/events``).

    It reads the store itself; the hub only tells it that rows may be new
    (every offer and notify, and each safety-net poll). Wake-ups coalesce into
    one flag, so a busy squad costs a watcher one store read per wait, not one
    per message.
    """

    __slots__ = ("dirty", "waiter")

    def __init__(self) -> None:
        self.dirty = False
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        """Mark new rows possible and resume the stream if it is waiting."""
        self.dirty = True
        self._resume()

    def _resume(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait for a wake-up (consuming it); False after ``timeout`` seconds without one."""
        if not self.dirty:
            loop = asyncio.get_running_loop()
            self.waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, self._resume)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        woken, self.dirty = self.dirty, False
        return woken


class Feed:
    """The fan-out point of one execution (exists while it has viewers)."""

    def __init__(self, hub: SseHub, execution: UUID) -> None:
        self.hub = hub
        self.execution = execution
        self.viewers: set[Viewer] = set()
        self.last_seq: int | None = None  # None until primed from the store
        self.expected: dict[UUID, float] = {}
        self._dirty = False
        self._fetching: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._backoff = Backoff(STORE_POLL)
        self.last_read = 0.0

    async def prime(self) -> None:
        """Start after what the store holds now; earlier rows are each viewer's own catch-up."""
        snapshot = await self.hub.store.snapshot(self.execution)
        if self.last_seq is None:
            self.last_seq = snapshot.last_seq

    def fan_out(self, seq: int, frame: bytes) -> None:
        """Queue one frame to every viewer without waiting; full queues mark their viewer behind."""
        stats = self.hub.stats
        for viewer in self.viewers:
            if viewer.behind or not viewer.push(seq, frame):
                stats.frames_dropped += 1
            else:
                stats.frames_fanned_out += 1
        self.last_seq = seq

    def offer(self, rows: Sequence[StoredMessage]) -> None:
        """Fan out committed rows that continue the sequence; anything else triggers a store read."""
        if self.last_seq is None:
            return  # priming: the viewers' own catch-up covers these rows
        for row in sorted(rows, key=lambda r: r.seq):
            self.expected.pop(row.message.id, None)
            if row.seq <= self.last_seq:
                continue
            if row.seq != self.last_seq + 1:
                self.wake()
                return
            self.fan_out(row.seq, message_frame(row))
            self.last_read = time.monotonic()  # demonstrably current: the safety-net poll can wait

    def expect(self, ids: Iterable[UUID]) -> None:
        """Wait for these message ids to become visible in the store, then fan them out.

        The first store read is scheduled a moment later, not at once: a message
        is published before it is written, and when it is written in this
        process :meth:`offer` fans it out meanwhile, so no read is needed.
        """
        deadline = time.monotonic() + _EXPECT_TTL
        for message_id in ids:
            self.expected[message_id] = deadline
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(STORE_POLL.initial, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        if self.expected:
            self.wake()
        else:
            self._backoff.reset()

    def wake(self) -> None:
        """Read the store for rows after ``last_seq`` soon (coalesced: one read serves many wakes)."""
        self._dirty = True
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch())

    async def _fetch(self) -> None:
        while self._dirty and self.viewers:
            self._dirty = False
            if self.last_seq is None:
                return
            try:
                await self._read_once()
            except Exception:
                # the store is down: the periodic poll and the viewers' own catch-up retry later
                logger.exception("reading execution %s from the store failed", self.execution)
                return
        self._schedule_retry()

    async def _read_once(self) -> None:
        store, stats = self.hub.store, self.hub.stats
        while True:
            assert self.last_seq is not None
            stats.store_reads += 1
            self.last_read = time.monotonic()
            rows = await store.after(self.execution, self.last_seq, STORE_PAGE, max_bytes=self.hub.page_bytes)
            for row in rows:
                self.expected.pop(row.message.id, None)
                if self.last_seq is None or row.seq > self.last_seq:
                    self.fan_out(row.seq, message_frame(row))
            if not rows:  # a page may end early for its size: only an empty one is the end
                return

    def _schedule_retry(self) -> None:
        now = time.monotonic()
        for message_id, deadline in list(self.expected.items()):
            if deadline < now:
                logger.debug("message %s never became visible in the store; giving up on it", message_id)
                del self.expected[message_id]
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if not self.expected or not self.viewers:
            self._backoff.reset()
            return
        self._retry = asyncio.get_running_loop().call_later(self._backoff.next(), self._on_retry)

    def close(self) -> None:
        """Stop timers and the pending read (the last viewer left)."""
        if self._retry is not None:
            self._retry.cancel()
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()


class SseHub:
    """All live feeds of one service process.

    ``queue_size`` frames and ``buffer_bytes`` bytes are the most a viewer's
    queue holds before the viewer is caught up from the store instead;
    ``page_bytes`` bounds the message bodies of one store read.
    """

    def __init__(
        self, store: HistoryStore, *, queue_size: int = 1024, poll_interval: float = 5.0,
        buffer_bytes: int = 4 * 1024 * 1024, page_bytes: int = 1024 * 1024,
    ) -> None:
        if queue_size < 1 or poll_interval <= 0 or buffer_bytes < 1 or page_bytes < 1:
            raise ValueError("queue_size, buffer_bytes and page_bytes must be >= 1 and poll_interval > 0")
        self.store = store
        self.queue_size = queue_size
        self.buffer_bytes = buffer_bytes
        self.page_bytes = page_bytes
        self.poll_interval = poll_interval
        self.stats = HubStats()
        self._feeds: dict[UUID, Feed] = {}
        self._watchers: set[Watcher] = set()
        self._poller: asyncio.Task[None] | None = None
        self.closing = False
        """Set by :meth:`end_streams`: every stream ends after sending what it holds."""

    @property
    def viewer_count(self) -> int:
        """Connected viewers over all executions."""
        return sum(len(feed.viewers) for feed in self._feeds.values())

    @property
    def feed_count(self) -> int:
        """Executions that have at least one viewer."""
        return len(self._feeds)

    async def start(self) -> None:
        """Start the periodic safety-net poll (idempotent)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def end_streams(self) -> None:
        """End every open stream (and any opened later) once it has sent what it holds. Idempotent.

        Called when the server starts to stop, so that no stream holds its
        graceful shutdown; each client resumes elsewhere or later with
        ``Last-Event-ID``, so nothing is lost.
        """
        if self.closing:
            return
        self.closing = True
        streams = self.viewer_count + len(self._watchers)
        for feed in self._feeds.values():
            for viewer in feed.viewers:
                viewer.wake()
        self._wake_watchers()
        if streams:
            logger.info("ending %d SSE streams: the server is stopping (clients resume with Last-Event-ID)", streams)

    async def close(self) -> None:
        """End every stream, stop polling and every feed. Idempotent."""
        self.end_streams()
        poller, self._poller = self._poller, None
        try:
            await cancel_and_wait(poller)
        finally:
            for feed in self._feeds.values():
                feed.close()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            cutoff = time.monotonic() - self.poll_interval
            for feed in list(self._feeds.values()):
                if feed.last_read < cutoff:
                    feed.wake()
            self._wake_watchers()

    def watch(self) -> Watcher:
        """Register a stream that follows every message (see :class:`Watcher`)."""
        watcher = Watcher()
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        """Unregister ``watcher``. Idempotent."""
        self._watchers.discard(watcher)

    def _wake_watchers(self) -> None:
        for watcher in self._watchers:
            watcher.wake()

    async def join(self, execution: UUID) -> Viewer:
        """Register a viewer of ``execution`` (its feed is created and primed on first join)."""
        viewer = Viewer(execution, self.queue_size, self.buffer_bytes)
        feed = self._feeds.get(execution)
        if feed is None:
            feed = self._feeds[execution] = Feed(self, execution)
        feed.viewers.add(viewer)
        if feed.last_seq is None:
            try:
                await feed.prime()
            except BaseException:
                self.leave(viewer)
                raise
        return viewer

    def leave(self, viewer: Viewer) -> None:
        """Unregister ``viewer``; the last one out drops the feed. Cancels nothing else."""
        feed = self._feeds.get(viewer.execution)
        if feed is None:
            return
        feed.viewers.discard(viewer)
        if not feed.viewers:
            feed.close()
            del self._feeds[viewer.execution]

    def offer(self, rows: Sequence[StoredMessage]) -> None:
        """Rows just committed by this process (db-writer ``on_written``, HTTP write-through)."""
        if rows:
            self._wake_watchers()
        by_execution: dict[UUID, list[StoredMessage]] = {}
        for row in rows:
            execution = row.message.task_execution_id
            if execution is not None and execution in self._feeds:
                by_execution.setdefault(execution, []).append(row)
        for execution, group in by_execution.items():
            self._feeds[execution].offer(group)

    async def on_written(self, rows: list[StoredMessage]) -> None:
        """The db-writer's ``on_written`` callback."""
        self.offer(rows)

    def notify(self, execution: UUID, message_ids: Iterable[UUID] = ()) -> None:
        """A message of ``execution`` was published somewhere: read the store once it is there."""
        self._wake_watchers()
        feed = self._feeds.get(execution)
        if feed is not None:
            feed.expect(message_ids)


class ViewerStream:
    """The frames one SSE client receives: snapshot, resume from the store, then live events.

    ``last`` is the highest seq sent. A live frame that does not continue it
    (the viewer's queue overflowed, or it joined while rows were committed) is
    replaced by a read of the store after ``last``; rows the store no longer
    holds because of retention become one ``gap`` event (reason
    ``retention``), and seqs the store holds but cannot read (it skips such
    rows) one ``gap`` each (reason ``unreadable``), so a bad row never stalls
    a stream.
    """

    def __init__(self, hub: SseHub, viewer: Viewer, *, after: int, heartbeat: float) -> None:
        self.hub = hub
        self.viewer = viewer
        self.last = after
        self.heartbeat = heartbeat

    async def catch_up(self) -> AsyncIterator[bytes]:
        """Chunks of every stored row after ``last`` (and a gap event when retention removed some).

        Read page by page (``page_bytes`` of bodies at most) and sent as read,
        so a replay never holds more than a page, however long the history.
        """
        hub, execution, stats = self.hub, self.viewer.execution, self.hub.stats
        store = hub.store
        while not hub.closing:  # stopping: what was sent stands, the client resumes after it
            stats.store_reads += 1
            rows = await store.after(execution, self.last, STORE_PAGE, max_bytes=self.hub.page_bytes)
            if not rows:
                return
            if rows[0].seq > self.last + 1:
                snapshot = await store.snapshot(execution)
                if snapshot.first_seq > self.last + 1:
                    yield self.gap_frame(snapshot.first_seq - 1, "retention")
                    stats.gaps_sent += 1
                if rows[0].seq > self.last + 1:
                    again = await store.after(execution, self.last, 1, max_bytes=1)
                    if again and again[0].seq < rows[0].seq:
                        # the missing rows were not visible yet: read again shortly
                        self.viewer.behind = True
                        return
            chunk: list[bytes] = []
            size = 0
            for row in rows:
                if row.seq > self.last:
                    if row.seq > self.last + 1:
                        # stored but unreadable (the store logs and skips such a row), or removed by hand
                        frame = self.gap_frame(row.seq - 1, "unreadable")
                        stats.gaps_sent += 1
                        chunk.append(frame)
                        size += len(frame)
                    frame = message_frame(row)
                    self.last = row.seq
                    chunk.append(frame)
                    size += len(frame)
                    if size >= CHUNK_BYTES:
                        yield b"".join(chunk)
                        chunk, size = [], 0
            if chunk:
                yield b"".join(chunk)
            del rows  # not held through the next read: one page at a time

    def gap_frame(self, to_seq: int, reason: str) -> bytes:
        """The ``gap`` event: seqs ``last+1 .. to_seq`` are gone; the id moves past them."""
        frame = event_frame(
            "gap", {"from_seq": self.last + 1, "to_seq": to_seq, "reason": reason}, event_id=to_seq
        )
        self.last = to_seq
        return frame

    async def frames(self) -> AsyncIterator[bytes]:
        """Resume from the store, then live frames and heartbeats, until the client goes away or the hub ends it.

        When the hub ends the streams, the frames already buffered that
        continue the sequence are sent first.
        """
        viewer, hub = self.viewer, self.hub
        async for chunk in self.catch_up():
            yield chunk
        while not hub.closing:
            if viewer.behind:
                viewer.behind = False
                # drop what is buffered: the store read below covers it, in order
                viewer.take()
                self.hub.stats.viewer_catchups += 1
                async for chunk in self.catch_up():
                    yield chunk
                if viewer.behind:
                    await asyncio.sleep(_BEHIND_RETRY)
                continue
            if not await viewer.wait(self.heartbeat):
                if not hub.closing:
                    yield HEARTBEAT_FRAME
                continue
            if viewer.behind:
                continue
            if live := self._take_live():
                yield live
        if not viewer.behind and (live := self._take_live()):
            yield live

    def _take_live(self) -> bytes:
        """The buffered frames that continue ``last``, joined; marks the viewer behind at a hole."""
        viewer = self.viewer
        out: list[bytes] = []
        for seq, frame in viewer.take():
            if seq <= self.last:
                continue
            if seq != self.last + 1:
                viewer.behind = True
                break
            out.append(frame)
            self.last = seq
        return b"".join(out)
