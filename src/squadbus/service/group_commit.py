"""Group commit for the HTTP write-through and id claims: concurrent requests share one store transaction.

Each request hands its messages to :meth:`GroupWriter.write` (or its id
claims to :meth:`GroupWriter.claim`) and waits. One flusher task per kind
sends everything that queued up while the previous transaction was running
to the store in a single call (``store.write``, ``store.claim_groups``),
then hands each request its own part of the answer. An idle service goes to
the store at once (no added delay); a busy one commits many requests per
transaction instead of queueing them one commit at a time.

Claims are grouped per request: the store decides each request's claims on
their own, all or nothing, inside the shared transaction
(:class:`~squadbus.store.base.ClaimsIdGroups`), so one request's refusal
neither fails nor refuses another's. 32 concurrent POSTs with client-set
ids through ASGI, paired rounds on a 2-CPU machine: about 650 POST/s against
490 with one claim transaction per request on SQLite, 585 against 455 on
PostgreSQL (``bench/bench_post_ids.py`` compares with and without ids).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from squadbus.core.envelope import Message
from squadbus.core.errors import BackendError
from squadbus.store.base import ClaimsIdGroups, ClaimsIds, HistoryStore, IdClaim, StoredMessage

logger = logging.getLogger("squadbus.service.group_commit")

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class GroupCommit(Generic[Item, Answer]):
    """Runs concurrent requests' items through ``run`` in shared calls, one call at a time.

    ``run`` gets the queued requests' items (one sequence per request, in
    arrival order, at most ``max_batch`` items in all unless one request
    alone has more) and returns one answer per request, in the same order.
    A :class:`BackendError` fails every request of the call. Any other
    exception fails a lone request with a BackendError (and is logged);
    with several requests, one of them may be the cause, so each runs alone.
    """

    def __init__(self, run: Callable[[list[Sequence[Item]]], Awaitable[list[Answer]]], *, what: str,
                 max_batch: int = 1000) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.what = what
        self.max_batch = max_batch
        self.transactions = 0
        """Calls of ``run`` that succeeded (store transactions)."""
        self._run = run
        self._queue: deque[tuple[Sequence[Item], asyncio.Future[Answer]]] = deque()
        self._flusher: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for the next call (not counting those of the call running now)."""
        return len(self._queue)

    async def submit(self, items: Sequence[Item]) -> Answer:
        """Run ``items`` (one request's worth) in the next shared call and return this request's answer."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self._queue:
            group: list[tuple[Sequence[Item], asyncio.Future[Answer]]] = []
            size = 0
            while self._queue and (not group or size + len(self._queue[0][0]) <= self.max_batch):
                item = self._queue.popleft()
                group.append(item)
                size += len(item[0])
            await self._run_group(group)

    async def _run_group(self, group: list[tuple[Sequence[Item], asyncio.Future[Answer]]]) -> None:
        try:
            answers = await self._run([items for items, _ in group])
        except BackendError as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        except Exception:
            if len(group) == 1:
                _, future = group[0]
                if not future.done():
                    future.set_exception(BackendError(f"the store refused this {self.what}"))
                logger.exception("store %s failed for %d items", self.what, len(group[0][0]))
                return
            # one request's items may be the cause: run each request alone
            for item in group:
                await self._run_group([item])
            return
        self.transactions += 1
        for (_, future), answer in zip(group, answers, strict=True):
            if not future.done():
                future.set_result(answer)


class GroupWriter:
    """Coalesces concurrent ``write`` and ``claim`` calls into few store transactions (see module docstring)."""

    def __init__(self, store: HistoryStore, *, max_batch: int = 1000) -> None:
        self.store = store
        self.writes: GroupCommit[Message, list[StoredMessage]] = GroupCommit(
            self._write_groups, what="write", max_batch=max_batch)
        self.claims: GroupCommit[IdClaim, list[IdClaim]] = GroupCommit(
            self._claim_groups, what="claim", max_batch=max_batch)

    @property
    def max_batch(self) -> int:
        """Most messages (or claims) in one transaction, unless one request alone has more."""
        return self.writes.max_batch

    @property
    def transactions(self) -> int:
        """Write transactions committed so far."""
        return self.writes.transactions

    async def write(self, messages: Sequence[Message]) -> list[StoredMessage]:
        """Store ``messages`` (one request's worth) and return their rows, in order."""
        return await self.writes.submit(messages)

    async def claim(self, claims: Sequence[IdClaim]) -> list[IdClaim]:
        """Claim ids for one request, all or nothing, as ``ClaimsIds.claim`` (the store must claim ids).

        With a :class:`~squadbus.store.base.ClaimsIdGroups` store, concurrent
        requests' claims share one transaction, each decided on its own;
        with a plain ``ClaimsIds`` store, each request makes its own.
        """
        if isinstance(self.store, ClaimsIdGroups):
            return await self.claims.submit(claims)
        if isinstance(self.store, ClaimsIds):
            return await self.store.claim(claims)
        raise TypeError(f"{type(self.store).__name__} does not claim ids")

    async def _write_groups(self, groups: list[Sequence[Message]]) -> list[list[StoredMessage]]:
        rows = await self.store.write([m for messages in groups for m in messages])
        out: list[list[StoredMessage]] = []
        offset = 0
        for messages in groups:
            out.append(rows[offset: offset + len(messages)])
            offset += len(messages)
        return out

    async def _claim_groups(self, groups: list[Sequence[IdClaim]]) -> list[list[IdClaim]]:
        assert isinstance(self.store, ClaimsIdGroups)
        return await self.store.claim_groups(groups)
