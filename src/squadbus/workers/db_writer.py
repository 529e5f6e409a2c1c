"""The db-writer: every message and reply into the HistoryStore, batched, exactly once.

It joins consumer group ``db-writer`` on ``agent.>`` (one subscription, so
a backend that filters wildcards on the client reads each message once) with
:meth:`~squadbus.core.bus.Bus.subscribe_batch`, and stores messages and
replies; dead letters (``agent.dlq.>``) are acked without storing, they
are copies. Up to ``batch_size`` deliveries (what is ready, or what arrived
within ``max_wait``) are written and acked only after COMMIT. Batches commit
one at a time, in order. Every squadbus backend hands batches over itself; on
a backend that cannot, deliveries are gathered in-process with up to
``pipeline`` batches fetched ahead, so the next fills while one commits.

Parallel writes: with ``parallel_writes`` above 1 (by default the store's
``parallel_writes``: PostgreSQL's pool writes on several connections at once,
``postgresql://…?parallel_writes=2``; 1 unless set, and always 1 on SQLite,
which has one writer) a batch is split by execution into up to that many
parts, each written in its own transaction at the same time. An execution's messages of a batch are all in one part, in
order, and the next batch starts only when every part has committed or
failed, so each execution's rows are stored in publish order. Each part is
handled on its own below: a part that fails is retried, given back or
dead-lettered as a whole batch would be, and only the deliveries of the
parts that committed are acked (the store's idempotent write keeps one row
of any message written twice). While one part waits on the database
(BEGIN, the counters, COMMIT and its fsync: 8-14 ms of a 34 ms batch of 500
at load 3) the other is encoded and sent. Not the default: NATS ->
PostgreSQL in ``bench/bench_persist.py`` at load 2.2-4.8 (others' tests on
the 2 cores), 13-14 alternated runs each, gave 8.7k-25.2k rows/s (median
17.8k) with 2 parts against 10.1k-20.7k (median 17.5k) with one, and 1-5 µs
more db-writer CPU per row (two transactions per batch); at load 1.4-2.2, 8
runs each, 19.3k-28.7k (median 24.9k) against 20.0k-25.7k (median 24.5k):
within the noise; docs/benchmarks.md.
What happens on failure (of a batch, or of a part of one):

* store unreachable (ConnectionLost, BackendTimeout): the batch is retried in
  place (backoff up to 1 s) until the store answers, its deliveries' leases
  extended meanwhile, and nothing after it is written: a batch given back
  would be written after later ones, and the store would hand their
  executions' messages out of order (seen in tests/faults: a 7 s PostgreSQL
  outage put 5–6 rows after ~470 later ones of their executions). With
  ``retry_for`` set, the batch is nacked after that many seconds instead
  (order across the outage is then not kept). Stopping the worker nacks the
  batch at once; the backend redelivers it and the idempotent write stores
  each message once. The default ``max_deliver`` is very high, so an outage
  never dead-letters history;
* any other store error: the batch is written again one message at a time to
  find the message(s) the database refuses; those are dead-lettered
  (``Reject``) on redelivery, the rest are stored normally (in order, one by
  one). When nothing can be blamed (the store went away during those writes,
  or it refuses every message: disk full, permissions) the batch is retried
  in place as in an outage: given back, it would be written after later ones;
* an error outside the store's error tree (a driver broken mid-write): logged
  with its traceback and retried in place, for the same reason;
* ``on_written`` failing is logged: the rows are committed, so the batch is
  still acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal
from uuid import UUID

from squadbus.core import subjects
from squadbus.core.backend import ConsumerOptions, Delivery, Subscription, leases_kept
from squadbus.core.backoff import WRITE_RETRY, Backoff
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import BackendTimeout, Closed, ConnectionLost, InvalidMessage, Nack, Reject, SquadbusError
from squadbus.store.base import HistoryStore, StoredMessage

logger = logging.getLogger("squadbus.workers.db_writer")

GROUP = "db-writer"
PATTERNS = (subjects.ALL,)
_SKIPPED = subjects.DLQ_PREFIX + "."
_TRANSIENT = (ConnectionLost, BackendTimeout)
_POISON_MEMORY = 10_000

_Verdict = Literal["found", "none", "interrupted"]
OnWritten = Callable[[list[StoredMessage]], Awaitable[None]]
OnDeadLetters = Callable[[list[Message]], None]


@dataclass(slots=True)
class DbWriterStats:
    """Counters of one DbWriter."""

    batches: int = 0
    messages: int = 0
    store_failures: int = 0
    rejected: int = 0


class DbWriter:
    """Writes every message and reply (``agent.>`` but dead letters) to ``store`` (see the module docstring).

    ``on_written(rows)`` is awaited after each committed batch with one row
    per delivery (redelivered messages return their existing row);
    ``on_dead_letters(messages)`` is called with the dead letters of a batch
    (acked, not stored), e.g. to count them per group.
    ``options`` overrides the consumer options (``batch_size`` and
    ``max_in_flight`` come from ``batch_size`` and ``pipeline``);
    ``retry_for`` (default None: until the store answers) is how long a batch
    is retried in place while the store is unreachable before it is nacked.
    ``parallel_writes`` (default: the store's ``parallel_writes`` attribute,
    else 1) is how many parts of a batch, split by execution, are written at
    once.
    """

    name = GROUP

    def __init__(
        self,
        bus: Bus,
        store: HistoryStore,
        *,
        batch_size: int = 500,
        max_wait: float = 0.05,
        on_written: OnWritten | None = None,
        on_dead_letters: OnDeadLetters | None = None,
        retry_for: float | None = None,
        pipeline: int = 2,
        options: ConsumerOptions | None = None,
        parallel_writes: int | None = None,
    ) -> None:
        if parallel_writes is None:
            parallel_writes = getattr(store, "parallel_writes", 1)
        if (batch_size < 1 or pipeline < 1 or max_wait < 0 or (retry_for is not None and retry_for < 0)
                or not isinstance(parallel_writes, int) or parallel_writes < 1):
            raise ValueError("batch_size, pipeline and parallel_writes must be >= 1, max_wait and retry_for >= 0")
        self.bus = bus
        self.store = store
        self.batch_size = batch_size
        self.max_wait = max_wait
        self.on_written = on_written
        self.on_dead_letters = on_dead_letters
        self.retry_for = retry_for
        self.pipeline = pipeline
        self.parallel_writes = parallel_writes
        self.options = options or ConsumerOptions(max_deliver=1_000_000, backoff_base=0.1, backoff_max=5.0)
        self.stats = DbWriterStats()
        self._subs: list[Subscription] = []
        self._stopping = asyncio.Event()
        self._poison: OrderedDict[UUID, str] = OrderedDict()
        self._running = False

    async def start(self) -> None:
        """Join group ``db-writer`` on both patterns (idempotent)."""
        if self._running:
            return
        self._running = True
        self._stopping.clear()
        try:
            for pattern in PATTERNS:
                self._subs.append(await self.bus.subscribe_batch(
                    pattern, self._handle, group=GROUP, max_batch=self.batch_size, max_wait=self.max_wait,
                    pipeline=self.pipeline, options=self.options,
                ))
        except BaseException:
            await self.stop()
            raise
        logger.info("db-writer started (batch_size=%d, max_wait=%.3fs, parallel_writes=%d, store=%s)",
                    self.batch_size, self.max_wait, self.parallel_writes, type(self.store).__name__)

    async def stop(self) -> None:
        """Stop consuming; batches in flight are committed and acked first (idempotent).

        If the store is unreachable, the batch being retried is nacked at
        once instead of waiting out ``retry_for``, and stays on the backend.
        """
        if not self._running:
            return
        self._running = False
        self._stopping.set()
        subs, self._subs = self._subs, []
        for sub in subs:
            await self.bus.unsubscribe(sub)
        logger.info("db-writer stopped after %d messages in %d batches", self.stats.messages, self.stats.batches)

    async def _handle(self, deliveries: Sequence[Delivery]) -> dict[Delivery, BaseException]:
        """Write a batch; messages found poisonous on an earlier try are dead-lettered instead."""
        failures: dict[Delivery, BaseException] = {}
        fresh: list[Delivery] = []
        dead: list[Message] = []
        for delivery in deliveries:
            if delivery.message.subject.startswith(_SKIPPED):
                dead.append(delivery.message)  # acked, not stored: a dead letter is a copy of a stored message
                continue
            reason = self._poison.pop(delivery.message.id, None)
            if reason is not None:
                failures[delivery] = Reject(reason)
            else:
                fresh.append(delivery)
        if dead and self.on_dead_letters is not None:
            try:
                self.on_dead_letters(dead)
            except Exception:
                logger.exception("on_dead_letters callback failed for %d dead letters", len(dead))
        if fresh:
            # A long store outage must not hand the batch to another member meanwhile.
            async with leases_kept(fresh, max(0.5, self.options.ack_wait / 3)):
                failures.update(await self._process(fresh))
        return failures

    async def _process(self, deliveries: list[Delivery]) -> dict[Delivery, BaseException]:
        """Write the batch (in parts at once, see the module docstring); the deliveries of failed parts."""
        messages = [d.message for d in deliveries]
        parts = split_by_execution(messages, self.parallel_writes)
        if len(parts) == 1:
            try:
                rows = await self._write(messages)
            except Exception as exc:
                return dict.fromkeys(deliveries, exc)
            await self._written(rows)
            return {}
        results = await asyncio.gather(*(self._write([messages[i] for i in part]) for part in parts),
                                       return_exceptions=True)
        failures: dict[Delivery, BaseException] = {}
        written: list[tuple[int, StoredMessage]] = []
        for part, result in zip(parts, results, strict=True):
            if isinstance(result, Exception):
                failures.update((deliveries[i], result) for i in part)
            elif isinstance(result, BaseException):
                raise result  # cancelled: the backend gives the batch back
            else:
                written += zip(part, result, strict=True)
        if written:
            written.sort(key=lambda item: item[0])
            await self._written([row for _, row in written])
        return failures

    async def _written(self, rows: list[StoredMessage]) -> None:
        self.stats.batches += 1
        self.stats.messages += len(rows)
        if self.on_written is not None:
            try:
                await self.on_written(rows)
            except Exception:
                logger.exception("on_written callback failed for a committed batch of %d", len(rows))

    async def _write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        loop = asyncio.get_running_loop()
        deadline = None if self.retry_for is None else loop.time() + self.retry_for
        backoff = Backoff(WRITE_RETRY)
        logged: set[str] = set()
        error: Exception
        while True:
            try:
                return await self.store.write(messages)
            except _TRANSIENT as exc:
                self.stats.store_failures += 1
                why, error = "store unavailable", exc
            except Closed as exc:
                raise Nack(f"store closed: {exc}") from exc
            except (SquadbusError, ValueError) as exc:
                self.stats.store_failures += 1
                verdict = await self._isolate(messages, exc)
                if verdict == "found":
                    # The rest were written one by one, in order; the culprits are rejected on redelivery.
                    raise Nack(f"batch refused by the store: {exc}", delay=0.0) from exc
                # Nobody to blame: the store went away during the one-by-one writes, or it refuses every
                # message (disk full, permissions). Either way a batch given back would be written after
                # later ones, out of execution order: retry it in place like an outage.
                why = "store unavailable" if verdict == "interrupted" else "store refuses every message"
                error = exc
            except Exception as exc:
                # Outside the store's error tree (a driver error on a connection killed mid-write, e.g.
                # asyncpg's ProtocolError): given back, the batch would be written after later ones, out
                # of execution order, and nothing would say so. Retry it in place, loudly.
                self.stats.store_failures += 1
                why, error = f"store failed unexpectedly ({type(exc).__name__})", exc
                if why not in logged:
                    logger.error("%s writing a batch of %d; retrying it in place", why, len(messages), exc_info=exc)
                    logged.add(why)
            delay = backoff.next()
            if self._stopping.is_set() or (deadline is not None and loop.time() + delay > deadline):
                logger.warning("%s, returning a batch of %d for redelivery: %s", why, len(messages), error)
                raise Nack(f"{why}: {error}") from error
            if why not in logged:
                log = logger.warning if why == "store unavailable" else logger.error
                log("%s; retrying a batch of %d in place until it answers: %s", why, len(messages), error)
                logged.add(why)
            logger.info("%s, retrying a batch of %d in %.2fs: %s", why, len(messages), delay, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _isolate(self, messages: Sequence[Message], batch_error: BaseException) -> _Verdict:
        """Write one by one to find the messages the store refuses; remember them for Reject.

        A message is blamed only when it cannot be encoded, or when others of
        the batch were stored: if every write fails the database is at fault
        (disk full, permissions), and nothing is dead-lettered ("none"). A
        connection error ends the search with nothing blamed ("interrupted").
        """
        logger.warning("store refused a batch of %d (%s); writing one by one", len(messages), batch_error)
        refused: dict[UUID, str] = {}
        suspects: dict[UUID, str] = {}
        stored_any = False
        for message in messages:
            try:
                await self.store.write([message])
                stored_any = True
            except (ConnectionLost, BackendTimeout, Closed):
                return "interrupted"
            except InvalidMessage as exc:
                refused[message.id] = f"history store refused the message: {exc}"
            except (SquadbusError, ValueError) as exc:
                suspects[message.id] = f"history store refused the message: {type(exc).__name__}: {exc}"
        if stored_any:
            refused.update(suspects)
        for message_id, reason in refused.items():
            logger.error("message %s will be dead-lettered: %s", message_id, reason)
            self.stats.rejected += 1
            self._poison[message_id] = reason
        while len(self._poison) > _POISON_MEMORY:
            self._poison.popitem(last=False)
        return "found" if refused else "none"


def split_by_execution(messages: Sequence[Message], parts: int) -> list[list[int]]:
    """The indexes of ``messages`` in up to ``parts`` non-empty groups, each in input order, every
    message of an execution (and every message of none) in one group; executions go to the group
    with the fewest messages so far, largest first."""
    if parts == 1 or len(messages) < 2:
        return [list(range(len(messages)))]
    by_execution: dict[UUID | None, list[int]] = {}
    for i, message in enumerate(messages):
        group = by_execution.get(message.task_execution_id)
        if group is None:
            by_execution[message.task_execution_id] = [i]
        else:
            group.append(i)
    if len(by_execution) == 1:
        return [list(range(len(messages)))]
    groups: list[list[int]] = [[] for _ in range(min(parts, len(by_execution)))]
    for indexes in sorted(by_execution.values(), key=len, reverse=True):
        min(groups, key=len).extend(indexes)
    for group in groups:
        group.sort()
    return groups
