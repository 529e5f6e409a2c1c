"""Who has an inbox on the broker, for ``GET /v1/agents``: read from the backend, cached and bounded.

The backend's answer depends on what it can tell (``kind``):

* ``open``: a :class:`~squadbus.core.inbox_source.ListsInboxes` backend (memory, Redis, NATS) lists the
  agents whose inbox is open now, in any process, with the holder and since when where it knows them;
* ``known``: a backend that only reports consumer groups
  (:class:`~squadbus.core.backend.DescribesGroups`: Kafka, RabbitMQ once it reports them) has the inbox
  groups ``inbox-<agent>`` it keeps, whether or not anyone reads them now (Kafka has them only with
  ``inboxes=false``: its multiplexed inboxes leave the broker no per-agent trace);
* ``None``: neither (``dual://``), nothing is listed.

Read at most once per ``max_age`` (1.5 s) however many requests ask, and for at most ``timeout`` (2 s),
as ``/metrics`` reads the group figures (:class:`~squadbus.service.metrics.GroupReader`): a broker that
fails or does not answer in time leaves no agents and ``up`` False, and the request goes on without them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

from squadbus.core import subjects
from squadbus.core.backend import Backend, DescribesGroups, GroupFigures
from squadbus.core.inbox_source import INBOX_GROUP_PREFIX, InboxPresence, ListsInboxes
from squadbus.service.bounded_read import BoundedRead

logger = logging.getLogger("squadbus.service")

PRESENCE_TIMEOUT = 2.0
PRESENCE_MAX_AGE = 1.5

InboxKind = Literal["open", "known"]
_DIRECT_HEAD = subjects.MESSAGE_PREFIX + "."


def inbox_kind(backend: Backend) -> InboxKind | None:
    """What ``backend`` can tell about inboxes (see the module docstring)."""
    if isinstance(backend, ListsInboxes):
        return "open"
    if isinstance(backend, DescribesGroups):
        return "known"
    return None


def inbox_groups(figures: Sequence[GroupFigures]) -> list[InboxPresence]:
    """The agents of the inbox groups among ``figures``: ``inbox-<agent>`` on ``agent.message.<agent>``.

    The agent comes from the group's subject when it is a direct one (a group read back from a
    broker-side name has ``_`` for characters the broker does not allow), else from its name.
    """
    out: dict[str, InboxPresence] = {}
    for f in figures:
        if not f.group.startswith(INBOX_GROUP_PREFIX):
            continue
        agent = f.group[len(INBOX_GROUP_PREFIX):]
        rest = f.subject[len(_DIRECT_HEAD):] if f.subject.startswith(_DIRECT_HEAD) else ""
        if rest and "." not in rest and f.subject != subjects.BROADCAST:
            agent = rest
        if agent:
            out[agent] = InboxPresence(agent_id=agent)
    return list(out.values())


class PresenceReader:
    """The agents with an inbox on the broker, read at most once per ``max_age``, each read bounded by
    ``timeout``; concurrent requests share one read. A read that times out is cancelled and not waited
    for (:mod:`squadbus.service.bounded_read`)."""

    def __init__(self, *, timeout: float = PRESENCE_TIMEOUT, max_age: float = PRESENCE_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.max_age = max_age
        self.agents: dict[str, InboxPresence] = {}
        self.up: bool | None = None
        """None before the first read (or when the backend cannot tell)."""
        self._clock = clock
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self._reads: BoundedRead[list[InboxPresence]] = BoundedRead()

    async def refresh(self, backend: Backend) -> InboxKind | None:
        """Read again unless a read younger than ``max_age`` exists; never raises; what the backend can tell."""
        kind = inbox_kind(backend)
        if kind is None:
            return None
        async with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self.max_age:
                return kind
            try:
                found = await self._read(backend)
            except Exception as exc:  # whatever the broker or driver does, the listing goes on
                if self.up is not False:
                    logger.warning("/v1/agents: no inboxes from the backend (%s: %s); agents are listed "
                                   "from the history only until it answers", type(exc).__name__, exc)
                self.agents, self.up = {}, False
            else:
                if self.up is False:
                    logger.info("/v1/agents: inboxes from the backend are back")
                self.agents, self.up = {p.agent_id: p for p in found}, True
            self._read_at = self._clock()
        return kind

    async def _read(self, backend: Backend) -> list[InboxPresence]:
        return await self._reads.run(lambda: _ask(backend), self.timeout)


async def _ask(backend: Backend) -> list[InboxPresence]:
    if isinstance(backend, ListsInboxes):
        return list(await backend.open_inboxes())
    if isinstance(backend, DescribesGroups):
        return inbox_groups(await backend.group_figures())
    return []
