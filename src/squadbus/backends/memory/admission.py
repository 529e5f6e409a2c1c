"""Publishers blocked on full groups: queued in arrival order, admitted to all their groups at once.

A publish goes to every group its subject routes to, all or nothing. A group
that blocks publishers (``SlowConsumerPolicy.BLOCK`` with a member) and has no
free slot, or has publishers waiting already, makes a newcomer wait: it takes
a *ticket* (its arrival order) and queues on that group. A waiting publisher
is *admitted* when every group it publishes to has a free slot and no older
publisher waits on any of them; admission reserves a slot in each of its
groups at once (as many publishers are admitted as there are slots), and the
publisher pushes as soon as it runs. A newcomer that finds a group with free
slots and nobody waiting pushes at once: it may pass publishers admitted
but not run yet (at most as many as the group has slots), never one waiting.
Admitting one publisher per push instead (strict order) made a convoy: once
contended, every send waited its turn even with the buffer nearly empty.

Every queue is kept in ticket order, and a publisher joins the queue of each
group it finds blocked when it is checked (not only the first it met). So the
oldest publisher waiting anywhere is at the head of every queue it is in: it
goes through as soon as its groups have room, and nobody waits behind a
younger one (no starvation, no deadlock). Slots are reserved only at
admission, all at once, so no publisher holds a slot while it waits for
another (with reserved, still empty slots nothing would free them).

A publisher that woke up in one group and gave its slot away when another
group of its message had waiters livelocked here: two full groups, every
publisher to both, each handing its slot to the next forever
(tests/core/test_memory_fairness.py).
"""

from __future__ import annotations

import asyncio
from bisect import insort
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squadbus.backends.memory.group import GroupBuffer


class SpaceWaiter:
    """One blocked publish: its ticket, the groups that may block it, the queues it is in."""

    __slots__ = ("future", "groups", "queued", "ticket")

    def __init__(self, ticket: int, groups: tuple[GroupBuffer, ...], future: asyncio.Future[None]) -> None:
        self.ticket = ticket
        self.groups = groups
        self.queued: list[GroupBuffer] = []
        self.future = future


def _ticket(waiter: SpaceWaiter) -> int:
    return waiter.ticket


def _blocked_at(waiter: SpaceWaiter) -> GroupBuffer | None:
    """A group ``waiter`` cannot push to now: no free slot (reserved ones count as taken), or an older
    publisher waiting there."""
    for group in waiter.groups:
        if not group.blocks_publishers():
            continue
        if not group.has_space():
            return group
        queue = group.space_waiters
        if queue and queue[0] is not waiter and queue[0].ticket < waiter.ticket:
            return group
    return None


def try_admit(waiter: SpaceWaiter) -> bool:
    """Admit ``waiter`` (reserve a slot in each of its groups and wake it) if it can go now; else queue
    it on the group that stops it (in ticket order) and return False."""
    blocked = _blocked_at(waiter)
    if blocked is not None:
        if blocked not in waiter.queued:
            insort(blocked.space_waiters, waiter, key=_ticket)
            waiter.queued.append(blocked)
        return False
    for group in waiter.groups:
        group.reserved += 1
    left, waiter.queued = waiter.queued, []
    for group in left:
        group.space_waiters.remove(waiter)
    waiter.future.set_result(None)
    for group in left:
        admit_next(group)  # the next ones may fit too
    return True


def admit_next(group: GroupBuffer) -> None:
    """Admit the publishers at the head of ``group``'s queue while they can go (after a slot freed, a
    waiter left or pushed, or the group stopped blocking)."""
    queue = group.space_waiters
    while queue:
        head = queue[0]
        if head.future.done():  # cancelled while queued; its publisher leaves when it runs
            leave(head)
            continue
        if not try_admit(head):
            return


def leave(waiter: SpaceWaiter) -> None:
    """Take ``waiter`` out of every queue it is in (cancelled or timed out) and let the next ones go."""
    left, waiter.queued = waiter.queued, []
    for group in left:
        if waiter in group.space_waiters:
            group.space_waiters.remove(waiter)
    for group in left:
        admit_next(group)


def settle(waiter: SpaceWaiter) -> None:
    """Give back the slots reserved at admission (the publisher pushed, or gave up before it ran) and
    let the next publishers in."""
    for group in waiter.groups:
        group.reserved -= 1
    for group in waiter.groups:
        if group.space_waiters:
            admit_next(group)


async def wait_for_room(waiter: SpaceWaiter) -> None:
    """Wait until ``waiter`` is admitted: it then holds a slot in each of its groups, pushes without
    yielding and calls :func:`settle`. Cancelled (the publish timeout), it leaves its queues or
    gives back the slots it was given."""
    if try_admit(waiter):
        return
    try:
        await waiter.future
    except BaseException:
        if waiter.future.done() and not waiter.future.cancelled():
            settle(waiter)
        else:
            leave(waiter)
        raise
