"""MemoryBackend: routing, publish with the slow-consumer policy, groups, replay window, dedupe."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec

from squadbus.backends.memory.admission import SpaceWaiter, admit_next, settle, wait_for_room
from squadbus.backends.memory.group import GroupBuffer
from squadbus.backends.memory.group_figures import group_figures as describe_groups
from squadbus.backends.memory.inboxes import MemoryInbox
from squadbus.backends.memory.presence import open_inboxes as list_open_inboxes
from squadbus.backends.memory.settings import MemorySettings
from squadbus.backends.memory.subscription import MemorySubscription
from squadbus.core import subjects
from squadbus.core.backend import BatchRawHandler, ConsumerOptions, GroupFigures, RawHandler, StartFrom
from squadbus.core.envelope import Message, encode
from squadbus.core.errors import BackendTimeout, Closed
from squadbus.core.inbox_source import InboxPresence

logger = logging.getLogger("squadbus.backends.memory")

_ROUTE_CACHE_LIMIT = 50_000
# A reply's subject is used once (agent.reply.<bus>.<request id>): caching its route kept a dict
# entry and a GC-tracked tuple per request, up to the limit (issue 15, scenario 5's growing objects).
_ONE_OFF = subjects.REPLY_PREFIX + "."

# A message in the replay window: (seq, subject, task_execution_id as an int or None, created_at, its JSON
# bytes). A tuple of atoms, which the collector stops tracking: a Message itself is not tracked, but its two
# UUIDs are, 20,000 objects at the default window that every full collection scanned (issue 15). Costs an
# encode per publish (~1 us) and a decode per message read back (replay, read_all, a new EARLIEST group).
_Retained = tuple[int, str, int | None, datetime, bytes]
_decode = msgspec.json.Decoder(Message).decode


def _retained(seq: int, message: Message) -> _Retained:
    execution = message.task_execution_id
    return seq, message.subject, None if execution is None else execution.int, message.created_at, encode(message)


class MemoryBackend:
    """In-process backend; see the module docstring for its contract."""

    name = "memory"

    def __init__(self, settings: MemorySettings | None = None) -> None:
        self.settings = settings or MemorySettings()
        self._exact: dict[str, list[GroupBuffer]] = {}
        self._wild: list[GroupBuffer] = []
        self._groups: dict[tuple[str, str], GroupBuffer] = {}
        self._route_cache: dict[str, tuple[GroupBuffer, ...]] = {}  # subject -> its wildcard groups
        self._wild_routes: dict[tuple[GroupBuffer, ...], tuple[GroupBuffer, ...]] = {}  # one tuple per match set
        self._log: deque[_Retained] = deque(maxlen=self.settings.retain_messages or None)
        self._seq = itertools.count(1)
        self._tickets = itertools.count()  # arrival order of blocked publishers
        self._last_seq = 0
        # A set plus a FIFO of ids as ints: O(1) expiry (a dict's oldest-key pop
        # degrades as it churns), and ints, unlike UUID objects, are not GC-tracked.
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._dedupe_window = self.settings.dedupe_window
        self._retain = self.settings.retain_messages > 0
        self._duplicates = 0
        self._connected = False
        self._closed = False

    async def connect(self) -> None:
        """Nothing to connect to; marks the backend usable."""
        if self._closed:
            raise Closed("memory backend is closed")
        self._connected = True

    async def close(self) -> None:
        """Close every subscription (each finishes its handler in progress). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for group in list(self._groups.values()) + [g for gs in self._exact.values() for g in gs] + self._wild:
            for member in list(group.members):
                await member.close()
            group.cancel_timers()

    # ---- publish -----------------------------------------------------------------------------

    def _route(self, subject: str) -> Sequence[GroupBuffer]:
        """The groups ``subject`` goes to: its exact-subject groups (the list kept since they joined), then
        the wildcard groups that match it. Those are cached per subject as a tuple shared by every subject
        they match alike: a tuple per subject (an agent's direct subject heard by its inbox and the
        db-writer's ``agent.>``) was one more object per agent that every full collection scanned (issue 15)."""
        wild = self._route_cache.get(subject)
        if wild is None:
            wild = self._wild_route(subject)
        exact = self._exact.get(subject)
        if exact is None:
            return wild
        return (*exact, *wild) if wild else exact

    def _wild_route(self, subject: str) -> tuple[GroupBuffer, ...]:
        matched = tuple(g for g in self._wild if subjects.matches(g.pattern, subject))
        matched = self._wild_routes.setdefault(matched, matched)
        if subject.startswith(_ONE_OFF):
            return matched
        if len(self._route_cache) >= _ROUTE_CACHE_LIMIT:
            self._route_cache.clear()
        self._route_cache[subject] = matched
        return matched

    async def publish(self, message: Message) -> None:
        """Hand ``message`` to every matching group; returns once all buffered it."""
        if self._closed or not self._connected:
            raise Closed("memory backend is not connected")
        targets = self._route(message.subject)
        admitted: SpaceWaiter | None = None
        for group in targets:
            if (len(group.buffer) + group.reserved >= group.options.max_pending or group.space_waiters) \
                    and group.blocks_publishers():
                admitted = await self._wait_for_space(targets)
                targets = self._route(message.subject)
                break
        seen = self._seen
        key = message.id.int
        if key in seen:
            self._duplicates += 1
        else:
            if self._dedupe_window:
                seen.add(key)
                order = self._seen_order
                order.append(key)
                if len(order) > self._dedupe_window:
                    seen.discard(order.popleft())
            seq = self._last_seq = next(self._seq)
            if self._retain:
                self._log.append(_retained(seq, message))
            entry = (message, 0)
            for group in targets:
                group.push(entry)
        if admitted is not None:
            settle(admitted)  # after the pushes: the next publishers see the slots filled

    async def _wait_for_space(self, targets: Sequence[GroupBuffer]) -> SpaceWaiter:
        # All or nothing: admitted to every blocking target at once, in arrival order (see .admission);
        # the caller then pushes to all of them without yielding in between, and settles.
        waiter = SpaceWaiter(next(self._tickets), tuple(g for g in targets if g.blocks_publishers()),
                             asyncio.get_running_loop().create_future())
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await wait_for_room(waiter)
        except TimeoutError as exc:
            raise BackendTimeout(
                f"a consumer group stayed full for {self.settings.publish_timeout}s; nothing was published"
            ) from exc
        return waiter

    # ---- subscribe ---------------------------------------------------------------------------

    async def subscribe(
        self, pattern: str, handler: RawHandler, *, group: str | None, options: ConsumerOptions
    ) -> MemorySubscription:
        """Add a member to group ``(group, pattern)``, creating the group if needed."""
        target = self._join(pattern, group, options)
        member = MemorySubscription(self, target, handler=handler)
        target.members.add(member)
        member.run()
        return member

    def _join(self, pattern: str, group: str | None, options: ConsumerOptions) -> GroupBuffer:
        """The group a new member of ``(group, pattern)`` joins, created if needed."""
        if self._closed or not self._connected:
            raise Closed("memory backend is not connected")
        subjects.validate_pattern(pattern)
        target = self._groups.get((group, pattern)) if group is not None else None
        if target is None:
            target = GroupBuffer(group, pattern, options)
            if group is not None:
                self._groups[(group, pattern)] = target
                if options.start is StartFrom.EARLIEST:
                    self._backfill(target)
            self._attach(target)
        return target

    async def subscribe_batch(
        self, pattern: str, handler: BatchRawHandler, *, group: str | None, options: ConsumerOptions,
        max_wait: float,
    ) -> MemorySubscription:
        """Like :meth:`subscribe`, handing ``handler`` batches (BatchSubscriber)."""
        target = self._join(pattern, group, options)
        member = MemorySubscription(self, target, batches=handler, max_wait=max_wait)
        target.members.add(member)
        member.run()
        return member

    async def open_inbox(
        self, agent_id: str, handler: RawHandler, *, group: str, options: ConsumerOptions
    ) -> MemoryInbox:
        """Serve ``agent_id``'s direct messages to ``handler`` with no task while idle (MultiplexesInboxes;
        see :mod:`.inboxes`): a member of the durable group ``group`` on the agent's direct subject."""
        target = self._join(subjects.direct(agent_id), group, options)
        member = MemoryInbox(self, target, handler, options)
        target.members.add(member)
        target.holders.append(member)
        if target.holders[0] is member:
            member.kick()
        return member

    def _backfill(self, group: GroupBuffer) -> None:
        first = self._log[0][0] if self._log else self._last_seq + 1
        if first > 1:
            logger.info(
                "group %s starts at the replay window: %d earlier messages are only in the history store",
                group.name, first - 1,
            )
        for entry in self._log:
            if subjects.matches(group.pattern, entry[1]):
                group.buffer.append((_decode(entry[4]), 0))

    def _attach(self, group: GroupBuffer) -> None:
        if subjects.is_literal(group.pattern):
            self._exact.setdefault(group.pattern, []).append(group)
        else:
            self._wild.append(group)
        self._route_cache.clear()
        self._wild_routes.clear()

    def _detach(self, group: GroupBuffer) -> None:
        if subjects.is_literal(group.pattern):
            groups = self._exact.get(group.pattern, [])
            if group in groups:
                groups.remove(group)
            if not groups:
                self._exact.pop(group.pattern, None)
        elif group in self._wild:
            self._wild.remove(group)
        self._route_cache.clear()
        self._wild_routes.clear()
        group.cancel_timers()

    def _remove_member(self, member: MemorySubscription | MemoryInbox) -> None:
        group = member._group
        group.members.discard(member)
        if isinstance(member, MemoryInbox) and member in group.holders:
            first = group.holders[0] is member
            group.holders.remove(member)
            if first and group.holders:
                group.holders[0].kick()  # the next open of this agent takes over
        admit_next(group)  # a memberless group no longer blocks publishers
        if group.name is None and not group.members:
            self._detach(group)

    async def delete_group(self, group: str, pattern: str) -> bool:
        """Forget a named group and what it buffered. True if it existed."""
        target = self._groups.pop((group, pattern), None)
        if target is None:
            return False
        for member in list(target.members):
            await member.close()
        self._detach(target)
        return True

    # ---- replay and introspection ------------------------------------------------------------

    async def replay(
        self, task_execution_id: UUID, *, from_seq: int = 0, since: datetime | None = None
    ) -> AsyncIterator[tuple[int, Message]]:
        """Yield ``(seq, message)`` of one execution still in the replay window."""
        execution = task_execution_id.int
        for seq, _, entry_execution, created_at, data in list(self._log):
            if seq < from_seq or entry_execution != execution:
                continue
            if since is not None and created_at < since:
                continue
            yield seq, _decode(data)

    def read_all(
        self, pattern: str, *, since: datetime | None = None, on_unreadable: Callable[[bytes], None] | None = None,
    ) -> AsyncGenerator[Message, None]:
        """Every message still in the replay window matching ``pattern`` (ReadsAll), in publish order,
        up to the last one published when the iteration starts. Holds nothing unreadable."""
        subjects.validate_pattern(pattern)
        return self._read_all(pattern, since)

    async def _read_all(self, pattern: str, since: datetime | None) -> AsyncGenerator[Message, None]:
        for _, subject, _, created_at, data in list(self._log):
            if subjects.matches(pattern, subject) and (since is None or created_at >= since):
                yield _decode(data)

    async def group_figures(self) -> list[GroupFigures]:
        """Lag, pending and dead letters of every named group (DescribesGroups); see :mod:`.group_figures`."""
        return describe_groups(self)

    async def open_inboxes(self) -> list[InboxPresence]:
        """Agents with an open inbox on this backend instance (ListsInboxes); see :mod:`.presence`."""
        return list_open_inboxes(self)

    def stats(self) -> dict[str, Any]:
        """Replay window bounds, duplicates dropped, and per-group buffer state."""
        first = self._log[0][0] if self._log else self._last_seq + 1
        return {
            "replay_window": {"first_seq": first, "last_seq": self._last_seq, "retained": len(self._log),
                              "trimmed": first - 1},
            "duplicates_dropped": self._duplicates,
            "groups": [
                {"group": g.name, "pattern": g.pattern, "members": len(g.members), "pending": len(g.buffer),
                 "inflight": g.inflight, "dropped": g.dropped}
                for g in self._groups.values()
            ],
        }


def from_url(url: str) -> MemoryBackend:
    """A MemoryBackend from ``memory://[?retain_messages=N&dedupe_window=N&publish_timeout=S]``."""
    return MemoryBackend(MemorySettings.from_url(url))
