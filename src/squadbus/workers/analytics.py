"""The analytics worker: message counts by type, agent activity and question→reply response times.

Group ``analytics`` reads ``agent.message.>`` and ``agent.reply.>``. It keeps
plain in-memory figures (:class:`AnalyticsSnapshot`) that the HTTP service
exports as Prometheus metrics; run alone (``squadbus worker analytics``) it
logs a summary periodically. Several replicas share the group, so each sees
a part of the traffic and Prometheus sums them.

A *reply* is matched to its question by, in order: the ``correlation_id``
header (``Bus.request``/``Bus.reply``), ``metadata["in_reply_to"]`` (a message
id), or, for a ``message_type == "question"``, the next message in the same
execution from the asked agent back to the asker. Tracking is bounded
(``max_open_questions``, ``max_agents``); what is evicted is counted and
exported, never silently dropped. Message types are chosen by senders, so
``by_type`` counts the first ``max_types`` distinct types on their own and
every later one under ``other``.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar
from uuid import UUID

from squadbus.core.backend import ConsumerOptions, Delivery, Subscription
from squadbus.core.bus import CORRELATION_ID, REPLY_TO, Bus
from squadbus.core.envelope import Message

logger = logging.getLogger("squadbus.workers.analytics")

PATTERNS = ("agent.message.>", "agent.reply.>")
RESPONSE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
QUESTION = "question"
OTHER_TYPES = "other"

K = TypeVar("K")


@dataclass(slots=True)
class Histogram:
    """A cumulative-bucket histogram (Prometheus shape) without a metrics library.

    Workers keep plain figures like this one; the HTTP service exports them.
    """

    bounds: tuple[float, ...] = RESPONSE_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Record one value (seconds)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative count), ...]`` ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(slots=True)
class AgentActivity:
    """What one agent did, as seen by this worker."""

    sent: int = 0
    received: int = 0
    last_seen: datetime | None = None


@dataclass(slots=True)
class AnalyticsSnapshot:
    """The figures of the analytics worker (live objects; read, do not mutate)."""

    by_type: Counter[str] = field(default_factory=Counter)
    agents: OrderedDict[str, AgentActivity] = field(default_factory=OrderedDict)
    response_time: Histogram = field(default_factory=Histogram)
    agents_evicted: int = 0
    questions_evicted: int = 0
    messages: int = 0


class Analytics:
    """Counts traffic by type, tracks agent activity and measures response times (see module docstring)."""

    name = "analytics"

    def __init__(self, bus: Bus, *, max_agents: int = 100_000, max_open_questions: int = 100_000,
                 max_types: int = 10_000) -> None:
        if max_agents < 1 or max_open_questions < 1 or max_types < 1:
            raise ValueError("max_agents, max_open_questions and max_types must be at least 1")
        self.bus = bus
        self.max_agents = max_agents
        self.max_types = max_types
        self.max_open_questions = max_open_questions
        self.figures = AnalyticsSnapshot()
        self.latency = Histogram(LATENCY_BUCKETS)
        self._by_id: OrderedDict[UUID, datetime] = OrderedDict()
        self._by_pair: OrderedDict[tuple[UUID | None, str, str], datetime] = OrderedDict()
        self._subs: list[Subscription] = []

    # ---- bookkeeping -------------------------------------------------------------------------

    def _agent(self, agent_id: str) -> AgentActivity:
        agents = self.figures.agents
        activity = agents.get(agent_id)
        if activity is None:
            activity = agents[agent_id] = AgentActivity()
            if len(agents) > self.max_agents:
                agents.popitem(last=False)
                self.figures.agents_evicted += 1
        else:
            agents.move_to_end(agent_id)
        return activity

    def _remember(self, table: OrderedDict[K, datetime], key: K, at: datetime) -> None:
        table[key] = at
        if len(table) > self.max_open_questions:
            table.popitem(last=False)
            self.figures.questions_evicted += 1

    def record(self, message: Message) -> None:
        """Account for one message (public so tests and other callers can feed it directly)."""
        figures = self.figures
        figures.messages += 1
        by_type = figures.by_type
        kind = message.message_type
        if kind not in by_type and len(by_type) >= self.max_types:
            kind = OTHER_TYPES
        by_type[kind] += 1
        sender = self._agent(message.sender_id)
        sender.sent += 1
        sender.last_seen = message.created_at
        if message.recipient_id is not None:
            recipient = self._agent(message.recipient_id)
            recipient.received += 1
        self._match_reply(message)
        if REPLY_TO in message.headers or message.message_type == QUESTION:
            self._remember(self._by_id, message.id, message.created_at)
        if message.message_type == QUESTION and message.recipient_id is not None:
            key = (message.task_execution_id, message.recipient_id, message.sender_id)
            self._remember(self._by_pair, key, message.created_at)

    def _match_reply(self, message: Message) -> None:
        asked_at: datetime | None = None
        for ref in (message.headers.get(CORRELATION_ID), message.metadata.get("in_reply_to")):
            if isinstance(ref, str):
                try:
                    asked_at = self._by_id.pop(UUID(ref), None)
                except ValueError:
                    continue
                if asked_at is not None:
                    break
        if asked_at is None and message.recipient_id is not None:
            asked_at = self._by_pair.pop((message.task_execution_id, message.sender_id, message.recipient_id), None)
        if asked_at is not None:
            self.figures.response_time.observe(max(0.0, (message.created_at - asked_at).total_seconds()))

    # ---- worker ------------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        self.record(delivery.message)
        self.latency.observe(time.perf_counter() - started)

    async def start(self) -> None:
        """Subscribe as group ``analytics`` (idempotent)."""
        if self._subs:
            return
        options = ConsumerOptions(max_in_flight=1)
        for pattern in PATTERNS:
            self._subs.append(await self.bus.subscribe(pattern, self._handle, group=self.name, options=options))

    async def stop(self) -> None:
        """Unsubscribe; the handler in progress finishes and is acked. Idempotent."""
        subs, self._subs = self._subs, []
        for sub in subs:
            await self.bus.unsubscribe(sub)
        figures = self.figures
        logger.info(
            "analytics: %d messages, %d agents, %d responses timed",
            figures.messages, len(figures.agents), figures.response_time.count,
        )
