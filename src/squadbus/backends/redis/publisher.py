"""Auto-batching publisher: concurrent publishes share one round trip.

Each ``publish`` call queues its message; one flusher task sends everything
queued so far as Lua calls of up to ``publish_batch`` messages (dedupe + two
XADDs per message), so N concurrent publishers cost about one round trip, not
N. Each call is written as soon as it is packed (its messages encoded as they
are packed), so Redis runs one call while the next is packed. A
publish returns only when Redis answered for its message (and, in the durable
profile on Redis >= 7.2, after ``WAITAOF``), retries through connection loss
with backoff, and raises :class:`~squadbus.core.errors.ConnectionLost` or
:class:`~squadbus.core.errors.BackendTimeout` once its ``publish_timeout``
has passed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from squadbus.backends.redis._driver import (
    RETRYABLE,
    PackedCommand,
    WriteLog,
    aioredis,
    execute_streamed,
    redis_errors,
)
from squadbus.backends.redis.layout import KeyLayout, direct_recipient, is_reply
from squadbus.backends.redis.settings import RedisSettings
from squadbus.core.backoff import WRITE_RETRY, Backoff
from squadbus.core.envelope import Message, encode
from squadbus.core.errors import BackendError, BackendTimeout, Closed, ConnectionLost, PublishFailed

logger = logging.getLogger("squadbus.backends.redis.publisher")

# ARGV[1] = key prefix, ARGV[2] = dedupe window ms (0 = off), ARGV[3] = reply stream ttl ms; then six
# arguments per message: partition stream key, id, execution (or empty), subject, flag, payload.
# flag 0: plain, 1: reply subject (its stream expires), 2: plain and add the subject stream to the
# registry; 3 and 4: as 0 and 2 for a direct subject, whose agent's bell <prefix>:bell:<agent> is rung
# (an empty PUBLISH; see inboxes.py) once per call, after every message of the call is stored: a
# batch of 256 messages to one agent rang it 256 times (~0.5 us of Redis CPU per message). Key names are passed or
# built here rather than passed as KEYS (Redis Cluster is not supported anyway: one call touches
# several streams). Redis runs this script for every message, so it does as little as it can: the
# partition key comes whole from the publisher, and a subject's stream key is built once per call,
# not once per message.
#
# Dedupe: ids are kept in one set per window-long time bucket, <prefix>:ids:<bucket>; an id is a
# duplicate if the current or the previous bucket has it (so it is remembered for at least one
# window, at most two). Three set commands per call instead of a SET NX per message; the bucket
# before the previous one is UNLINKed (freed off the main thread), its PEXPIRE is the fallback.
#
# Partition entries carry the subject (s), the execution (x, for replay; left out when there is none)
# and the envelope (m); subject entries only the envelope: their stream names the subject, and every
# byte here is paid per message.
#
# Returns one character per message: '1' stored, '0' a duplicate id (stored before: that publish
# still succeeded).
PUBLISH_LUA = """
local prefix = ARGV[1]
local window = tonumber(ARGV[2])
local reply_ttl = tonumber(ARGV[3])
local seen = {}
if window > 0 then
  local ids, m = {}, 0
  for i = 5, #ARGV, 6 do
    m = m + 1
    ids[m] = ARGV[i]
  end
  local now = redis.call('TIME')
  local bucket = math.floor((tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) / window)
  local current = prefix .. ':ids:' .. bucket
  local previous = prefix .. ':ids:' .. (bucket - 1)
  for first = 1, m, 1000 do
    local last = math.min(first + 999, m)
    local a = redis.call('SMISMEMBER', current, unpack(ids, first, last))
    local b = redis.call('SMISMEMBER', previous, unpack(ids, first, last))
    for k = 1, last - first + 1 do
      if a[k] == 1 or b[k] == 1 then
        seen[ids[first + k - 1]] = true
      end
    end
    redis.call('SADD', current, unpack(ids, first, last))
  end
  redis.call('PEXPIRE', current, 2 * window + 1000)
  redis.call('UNLINK', prefix .. ':ids:' .. (bucket - 2))
end
local call = redis.call
local skeys = {}
local bells = {}
local out = {}
local n = 0
for i = 4, #ARGV, 6 do
  n = n + 1
  local id = ARGV[i + 1]
  if seen[id] then
    out[n] = '0'
  else
    if window > 0 then
      seen[id] = true
    end
    local s, flag, payload = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
    local sstream = skeys[s]
    if not sstream then
      sstream = prefix .. ':s:' .. s
      skeys[s] = sstream
    end
    local x = ARGV[i + 2]
    if x == '' then
      call('XADD', ARGV[i], '*', 's', s, 'm', payload)
    else
      call('XADD', ARGV[i], '*', 's', s, 'x', x, 'm', payload)
    end
    call('XADD', sstream, '*', 'm', payload)
    if flag == '1' then
      call('PEXPIRE', sstream, reply_ttl)
    elseif flag == '2' or flag == '4' then
      call('SADD', prefix .. ':subjects', sstream)
    end
    if flag == '3' or flag == '4' then
      bells[s] = true
    end
    out[n] = '1'
  end
end
for s in pairs(bells) do
  call('PUBLISH', prefix .. ':bell:' .. string.sub(s, 15), '')
end
return table.concat(out)
"""
PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()

# The script's per-message flags (see PUBLISH_LUA).
_PLAIN, _REPLY, _REGISTER, _DIRECT, _REGISTER_DIRECT = b"0", b"1", b"2", b"3", b"4"

_MAX_FLUSHERS = 3
_SCRIPTS_PER_RUN = 8
_REGISTERED_LIMIT = 100_000


class _Runs:
    """Runs of messages queued to be stored in order: each the messages of one ``publish`` (one) or of
    one chunk of ``publish_many``, stored in order and settled together by its future (it gets how
    many were new, the others were duplicates) before its deadline.

    Kept as parallel lists, the messages flat, rather than an object per run: a publish then keeps no
    object of its own alive while it waits but its future, and every such object is one more for the
    garbage collector to walk (500 concurrent sends kept ~12 tracked objects each, 2 of them here).
    """

    __slots__ = ("deadlines", "futures", "messages", "sizes")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.sizes: list[int] = []
        self.futures: list[asyncio.Future[int]] = []
        self.deadlines: list[float] = []

    def __len__(self) -> int:
        return len(self.futures)

    def take(self, runs: int) -> _Runs:
        """Remove the first ``runs`` runs and return them."""
        taken = _Runs()
        size = sum(self.sizes[:runs])
        taken.messages, self.messages = self.messages[:size], self.messages[size:]
        taken.sizes, self.sizes = self.sizes[:runs], self.sizes[runs:]
        taken.futures, self.futures = self.futures[:runs], self.futures[runs:]
        taken.deadlines, self.deadlines = self.deadlines[:runs], self.deadlines[runs:]
        return taken

    def live(self, now: float, expire: Callable[[], BaseException]) -> _Runs:
        """The runs not settled yet; those past their deadline get ``expire()`` and are left out."""
        if self.futures and now < min(self.deadlines) and not any(future.done() for future in self.futures):
            return self  # the common case: every run still waits
        live = _Runs()
        at = 0
        for size, future, deadline in zip(self.sizes, self.futures, self.deadlines, strict=True):
            if not future.done():
                if now >= deadline:
                    future.set_exception(expire())
                else:
                    live.messages += self.messages[at:at + size]
                    live.sizes.append(size)
                    live.futures.append(future)
                    live.deadlines.append(deadline)
            at += size
        return live


class RedisPublisher:
    """Batches concurrent publishes into one Lua call per round trip."""

    def __init__(self, client: aioredis.Redis, layout: KeyLayout, settings: RedisSettings) -> None:
        self._client = client
        self._layout = layout
        self._settings = settings
        self._pending = _Runs()
        self._flushers: set[asyncio.Task[None]] = set()
        # Subject streams this process already added to the registry (SADD once, not per message).
        self._registered: set[str] = set()
        # Subject -> (its wire form as the script's argument, its flag, the partition stream key of its
        # messages without an execution in wire form).
        self._subjects: dict[str, tuple[bytes, bytes, bytes]] = {}
        # Each partition stream's key as the script's argument, in wire form.
        self._partition_args = [_wire(layout.partition_stream(i).encode()) for i in range(layout.partitions)]
        self._closed = False
        self.wait_aof = False
        self.published = 0
        self.duplicates = 0
        self.batches = 0
        self.retries = 0

    async def publish(self, message: Message) -> bool:
        """Store ``message``; True if new, False if its id was seen within the dedupe window."""
        return await self.submit([message]) == 1

    async def publish_many(self, messages: list[Message]) -> None:
        """Store every message, in order: runs of up to ``_SCRIPTS_PER_RUN`` Lua calls of
        ``publish_batch`` messages, the calls of a run written one after another on one connection
        (Redis runs them in order), each run sent once the one before it is stored (so a retried run
        cannot overtake)."""
        limit = self._settings.publish_batch * _SCRIPTS_PER_RUN
        for first in range(0, len(messages), limit):
            await self.submit(messages[first:first + limit])

    def submit(self, messages: list[Message]) -> asyncio.Future[int]:
        """Queue ``messages`` to be stored in order; the future gets how many were new (the others
        were duplicates) once Redis has them, or the publish's error.

        A plain function returning the future, not a coroutine: a send awaits it directly, one
        coroutine frame less per message. Call it from a coroutine (it needs the running loop).
        """
        if self._closed:
            raise Closed("redis backend is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        pending = self._pending
        pending.messages += messages
        pending.sizes.append(len(messages))
        pending.futures.append(future)
        pending.deadlines.append(loop.time() + self._settings.publish_timeout)
        if not self._flushers:
            self._start_flusher()
        return future

    def _start_flusher(self) -> None:
        task = asyncio.get_running_loop().create_task(self._flush_loop(), name="squadbus-redis-publisher")
        self._flushers.add(task)

    async def close(self) -> None:
        """Refuse new publishes and wait for the ones in flight (each bounded by its timeout)."""
        self._closed = True
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)

    def _take_batch(self) -> _Runs:
        """Runs from the front of the queue, up to ``publish_batch`` messages (at least one run)."""
        limit = self._settings.publish_batch
        sizes = self._pending.sizes
        taken = 0
        size = 0
        while taken < len(sizes) and (taken == 0 or size + sizes[taken] <= limit):
            size += sizes[taken]
            taken += 1
        return self._pending.take(taken)

    async def _flush_loop(self) -> None:
        me = asyncio.current_task()
        try:
            while self._pending:
                batch = self._take_batch()
                if self._pending and len(self._flushers) < _MAX_FLUSHERS:
                    # More batches in flight: packing the next overlaps Redis running this one.
                    self._start_flusher()
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug, not a Redis error: fail these publishes, keep going
                    logger.exception("publish batch failed unexpectedly")
                    error = PublishFailed(f"publish failed unexpectedly: {exc!r}")
                    error.__cause__ = exc
                    _fail(batch, error)
        finally:
            # Synchronously, not in a done-callback: a publish arriving right after
            # the loop ends must see no flusher and start one.
            if me is not None:
                self._flushers.discard(me)

    async def _send(self, batch: _Runs) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(WRITE_RETRY)
        last: BaseException | None = None
        log = WriteLog()  # once a call was written, a later failure leaves its messages "maybe stored"
        while True:
            now = loop.time()
            live = batch.live(now, functools.partial(self._timeout_error, last, maybe_stored=log.written > 0))
            if not live:
                return
            batch = live
            budget = min(live.deadlines) - now
            try:
                async with asyncio.timeout(budget):
                    results = await self._execute(live, log)
            except TimeoutError as exc:  # our budget ran out (OSError subclass: catch it first)
                last = exc
                continue
            except RETRYABLE as exc:
                last = exc
                self.retries += 1
                logger.warning("publish of %d message(s) failed, retrying: %s", len(live), exc)
                await asyncio.sleep(min(backoff.next(), max(0.0, budget)))
                continue
            except BackendError as exc:
                _fail(live, exc)
                return
            except redis_errors.RedisError as exc:
                error = PublishFailed(f"Redis refused the publish: {exc}")
                error.__cause__ = exc
                _fail(live, error)
                return
            self.batches += 1
            at = 0
            for size, future in zip(live.sizes, live.futures, strict=True):
                fresh = results.count(b"1", at, at + size)
                at += size
                self.published += fresh
                self.duplicates += size - fresh
                if not future.done():
                    future.set_result(fresh)
            return

    def _timeout_error(self, last: BaseException | None, *, maybe_stored: bool) -> BackendError:
        seconds = self._settings.publish_timeout
        error: BackendError
        if last is None or isinstance(last, TimeoutError | redis_errors.TimeoutError):
            error = BackendTimeout(f"Redis did not confirm the publish within {seconds}s")
        elif maybe_stored:
            error = BackendTimeout(
                f"Redis did not confirm the publish within {seconds}s: it was written before the connection "
                f"failed, so it may be stored (retry with the same id): {last}")
        else:
            error = ConnectionLost(f"Redis was not reachable within the publish timeout of {seconds}s: {last}")
        error.__cause__ = last
        return error

    async def _execute(self, batch: _Runs, log: WriteLog) -> bytes:
        """Store ``batch`` with one Lua call per ``publish_batch`` messages on one connection, each call
        written as soon as it is packed (Redis runs it while the next is packed)."""
        fresh_subjects: set[str] = set()  # registered by the first of their messages in this batch
        try:
            replies = await self._call(self._scripts(batch, "EVALSHA", PUBLISH_SHA, fresh_subjects), log)
        except redis_errors.NoScriptError:  # a new or restarted server: send the source once
            fresh_subjects.clear()
            replies = await self._call(self._scripts(batch, "EVAL", PUBLISH_LUA, fresh_subjects), log)
        results = b"".join(replies)
        registered = self._registered
        if len(registered) > _REGISTERED_LIMIT:
            registered.clear()
        registered.update(fresh_subjects)
        return results

    def _scripts(
        self, batch: _Runs, command: str, script: str, fresh_subjects: set[str]
    ) -> Iterator[PackedCommand]:
        """The Lua calls storing ``batch``, packed one at a time (each message encoded as it is
        packed); adds the subjects they register to ``fresh_subjects``."""
        settings = self._settings
        registered = self._registered
        partitions = self._layout.partitions
        partition_args = self._partition_args
        known = self._subjects
        limit = settings.publish_batch
        head = (self._layout.prefix, int(settings.dedupe_window * 1000), int(settings.reply_ttl * 1000))
        parts: list[bytes] = []  # the current call's arguments, in wire form
        count = 0
        for message in batch.messages:
            if count == limit:
                yield _script(command, script, head, count, parts)
                parts, count = [], 0
            count += 1
            subject = message.subject
            seen = known.get(subject)
            if seen is None:
                seen = self._learn(subject)
            subject_arg, flag, partition_arg = seen
            if flag != _REPLY and subject not in registered and subject not in fresh_subjects:
                flag = _REGISTER_DIRECT if flag == _DIRECT else _REGISTER
                fresh_subjects.add(subject)
            payload = encode(message)
            execution = message.task_execution_id
            # Six arguments in wire form: partition stream key, id and execution (ASCII), subject,
            # flag, payload; one formatting per message (the payload is written as it is).
            if execution is None:
                head_arg = b"%b$32\r\n%032x\r\n$0\r\n\r\n%b$1\r\n%b\r\n$%d\r\n" % (
                    partition_arg, message.id.int, subject_arg, flag, len(payload))
            else:
                head_arg = b"%b$32\r\n%032x\r\n$36\r\n%b\r\n%b$1\r\n%b\r\n$%d\r\n" % (
                    partition_args[execution.int % partitions], message.id.int, str(execution).encode(),
                    subject_arg, flag, len(payload))
            parts += (head_arg, payload, b"\r\n")
        yield _script(command, script, head, count, parts)

    def _learn(self, subject: str) -> tuple[bytes, bytes, bytes]:
        """``subject``'s wire form, its flag (reply, direct or plain) and the partition stream key of its
        messages without an execution, remembered for the next messages on it."""
        known = self._subjects
        if len(known) > _REGISTERED_LIMIT:
            known.clear()
        flag = _REPLY if is_reply(subject) else _DIRECT if direct_recipient(subject) is not None else _PLAIN
        partition = self._partition_args[zlib.crc32(subject.encode()) % self._layout.partitions]
        seen = known[subject] = (_wire(subject.encode()), flag, partition)
        return seen

    async def _call(self, scripts: Iterator[PackedCommand], log: WriteLog) -> list[Any]:
        """Run the publish scripts, each written once packed, and return their replies; in the durable
        profile on Redis >= 7.2, WAITAOF after them on the same connection."""
        if not self.wait_aof:
            return await execute_streamed(self._client, scripts, log)
        settings = self._settings
        timeout_ms = max(1, int(settings.publish_timeout * 1000))
        wait = PackedCommand("WAITAOF", 1, 0, timeout_ms)
        replies = await execute_streamed(self._client, itertools.chain(scripts, (wait,)), log)
        synced = replies[-1]
        if not synced or int(synced[0]) < 1:
            raise PublishFailed(f"Redis did not fsync the batch to its AOF within {settings.publish_timeout}s")
        return replies[:-1]


def _script(command: str, script: str, head: tuple[str, int, int], count: int, parts: list[bytes]) -> PackedCommand:
    """One ``EVALSHA``/``EVAL`` of the publish script over ``count`` messages' arguments ``parts``."""
    packed = PackedCommand(command, script, 0, *head)
    packed.add_packed(6 * count, parts)
    return packed


def _wire(data: bytes) -> bytes:
    """``data`` as one argument of a command in RESP."""
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _fail(runs: _Runs, error: BaseException) -> None:
    for future in runs.futures:
        if not future.done():
            future.set_exception(error)
