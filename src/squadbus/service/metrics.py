"""Prometheus metrics of one service app, in its own CollectorRegistry (never the global one).

Counters the service updates itself (messages published over HTTP, messages
committed to the store with their consumer lag) are prometheus-client
objects; figures kept by the Bus, the SSE hub and the workers are read at
scrape time by :class:`LiveCollector`, so those components stay free of any
metrics library.

Exported names (all prefixed ``squadbus_``):

* ``messages_published_total{message_type,backend}``: sent through the HTTP API ("in");
* ``messages_stored_total{message_type,worker}``: rows committed by this process (db-writer, http);
* ``messages_consumed_total{message_type,backend}``: seen by the analytics group ("out");
* ``consumer_lag_seconds{worker}``: ``created_at`` to commit, histogram (db-writer, http);
* ``handler_latency_seconds{worker}``: handler time of the in-process workers, histogram;
* ``bus_deliveries_total``, ``bus_redeliveries_total``, ``bus_nacks_total``,
  ``bus_dead_letters_total``, ``bus_handler_errors_total``, ``bus_gaps_total``: from ``Bus.stats``;
* ``sse_viewers``, ``sse_executions``, ``sse_frames_total``, ``sse_frames_dropped_total``,
  ``sse_catchups_total``, ``sse_gaps_total``: the SSE hub;
* ``response_time_seconds``: question→reply time (analytics), histogram;
* ``agents_tracked``, ``analytics_evicted_total{what}``;
* ``info{backend,version}``: always 1, names the backend;
* ``publish_latency_seconds{backend}``: one HTTP publish call (a batch is one call), histogram;
* ``dead_letters_total{group}``: dead letters the db-writer of this process saw, by group;
* ``group_lag{group,subject}``, ``group_pending{group,subject}``, ``group_dead_letters{group}``,
  ``group_redeliveries{group}``, ``group_figures_up``, ``group_figures_omitted``: the backend's
  consumer groups (:class:`~squadbus.core.backend.DescribesGroups`), read by :class:`GroupReader`.

Group figures come from the broker, so :meth:`ServiceMetrics.scrape` reads
them before rendering: at most once per ``max_age`` (1.5 s) however many
scrapers ask, and for at most ``timeout`` (2 s); a broker that is down or
does not answer makes ``group_figures_up`` 0 and the scrape goes on without
group figures. At most ``max_groups`` (200) groups are exported, those with
the most lag + pending first. docs/metrics.md describes every metric.

``message_type`` is chosen by whoever sends, so its label is bounded
(:class:`TypeLabels`): the first ``max_types`` distinct types (ServiceOptions
``metrics_message_types``, default 100) get a label of their own, every later
one counts under ``other``. Label values are at most 64 characters and show
control, separator and surrogate characters (CR, LF, NUL, U+2028, …) as
``\\uXXXX``, so a type can never break a line of the exposition. Bounded
labels keep a scrape small, so it is rendered on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from squadbus import __version__
from squadbus.core import subjects
from squadbus.core.backend import DescribesGroups, GroupFigures, ReportsFigures
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.service.bounded_read import BoundedRead
from squadbus.service.sse_hub import SseHub
from squadbus.store.base import StoredMessage
from squadbus.workers.analytics import Analytics
from squadbus.workers.analytics import Histogram as PlainHistogram

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
OTHER = "other"
MAX_LABEL_CHARS = 64
DEFAULT_MAX_TYPES = 100
PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
GROUP_TIMEOUT = 2.0
GROUP_MAX_AGE = 1.5
DEFAULT_MAX_GROUPS = 200
_DLQ = subjects.DLQ_PREFIX + "."

logger = logging.getLogger("squadbus.service")


def label_text(value: str) -> str:
    """``value`` as a label value: at most 64 characters, unprintable ones (CR, LF, NUL, ...) as ``\\uXXXX``."""
    head = value[:MAX_LABEL_CHARS]
    if head.isprintable():
        return head
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in head)


class TypeLabels:
    """The ``message_type`` label of a type: its own for the first ``max_types`` distinct types, then ``other``.

    First come, first kept: the set never changes once full, so a series never
    moves between labels (counters stay monotonic) and memory stays bounded.
    """

    def __init__(self, max_types: int = DEFAULT_MAX_TYPES) -> None:
        if max_types < 0:
            raise ValueError("max_types must be >= 0")
        self.max_types = max_types
        self._labels: dict[str, str] = {}

    def __call__(self, message_type: str) -> str:
        """The label for ``message_type``."""
        label = self._labels.get(message_type)
        if label is None:
            if len(self._labels) >= self.max_types:
                return OTHER
            label = self._labels[message_type] = label_text(message_type)
        return label


class GroupReader:
    """The backend's group figures for scrapes: read at most once per ``max_age``, each read bounded by ``timeout``.

    Concurrent scrapes share one read. A read that fails or times out leaves
    no figures and ``up`` False until the next read; it is logged once when
    the figures go away and once when they come back. A read that times out
    is cancelled and not waited for (:mod:`squadbus.service.bounded_read`).
    """

    def __init__(self, *, timeout: float = GROUP_TIMEOUT, max_age: float = GROUP_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.max_age = max_age
        self.figures: list[GroupFigures] = []
        self.up: bool | None = None
        """None before the first read."""
        self._clock = clock
        self._read_at: float | None = None
        self._lock = asyncio.Lock()
        self._reads: BoundedRead[Sequence[GroupFigures]] = BoundedRead()

    async def refresh(self, backend: DescribesGroups) -> None:
        """Read the figures unless a read younger than ``max_age`` exists; never raises, and waits at most
        ``timeout`` (plus the end of a read another scrape started)."""
        async with self._lock:
            now = self._clock()
            if self._read_at is not None and now - self._read_at < self.max_age:
                return
            try:
                figures = list(await self._read(backend))
            except Exception as exc:  # whatever the broker or driver does, the scrape goes on
                if self.up is not False:
                    logger.warning("/metrics: no consumer-group figures from the backend (%s: %s); "
                                   "squadbus_group_figures_up is 0 until it answers", type(exc).__name__, exc)
                self.figures, self.up = [], False
            else:
                if self.up is False:
                    logger.info("/metrics: consumer-group figures are back")
                self.figures, self.up = figures, True
            self._read_at = self._clock()

    async def _read(self, backend: DescribesGroups) -> Sequence[GroupFigures]:
        return await self._reads.run(backend.group_figures, self.timeout)


def _group_families(reader: GroupReader, max_groups: int) -> Iterator[Metric]:
    yield GaugeMetricFamily("squadbus_group_figures_up",
                            "1 when the backend answered the last read of its consumer groups, else 0",
                            value=int(bool(reader.up)))
    figures = sorted(reader.figures, key=lambda f: -((f.lag or 0) + (f.pending or 0)))
    kept = figures[:max_groups]
    yield GaugeMetricFamily("squadbus_group_figures_omitted", "Groups left out beyond the export limit",
                            value=len(figures) - len(kept))
    lag = GaugeMetricFamily("squadbus_group_lag", "Messages a consumer group has not been handed yet",
                            labels=["group", "subject"])
    pending = GaugeMetricFamily("squadbus_group_pending", "Messages handed to a consumer group and not acknowledged",
                                labels=["group", "subject"])
    # Summed per label set: names cut at 64 characters (or read back from durable names) may meet,
    # and a repeated series would make Prometheus refuse the whole scrape.
    lags: dict[tuple[str, str], int] = {}
    pendings: dict[tuple[str, str], int] = {}
    dead: dict[str, int] = {}
    redelivered: dict[str, int] = {}
    for f in kept:
        key = (label_text(f.group), label_text(f.subject))
        group = key[0]
        if f.lag is not None:
            lags[key] = lags.get(key, 0) + f.lag
        if f.pending is not None:
            pendings[key] = pendings.get(key, 0) + f.pending
        if f.dead_letters is not None:  # one DLQ per group name, whatever the pattern
            dead[group] = max(dead.get(group, 0), f.dead_letters)
        if f.redeliveries is not None:
            redelivered[group] = redelivered.get(group, 0) + f.redeliveries
    for key, value in sorted(lags.items()):
        lag.add_metric(list(key), value)
    for key, value in sorted(pendings.items()):
        pending.add_metric(list(key), value)
    yield lag
    yield pending
    dead_family = GaugeMetricFamily("squadbus_group_dead_letters",
                                    "Dead letters of a group the backend holds on agent.dlq.<group>", labels=["group"])
    for group, count in sorted(dead.items()):
        dead_family.add_metric([group], count)
    yield dead_family
    redelivered_family = GaugeMetricFamily(
        "squadbus_group_redeliveries", "Unacknowledged messages of a group delivered more than once", labels=["group"],
    )
    for group, count in sorted(redelivered.items()):
        redelivered_family.add_metric([group], count)
    yield redelivered_family


@dataclass(slots=True)
class Sources:
    """What :class:`LiveCollector` reads at scrape time (filled in by the lifespan)."""

    bus: Bus | None = None
    hub: SseHub | None = None
    analytics: Analytics | None = None
    latencies: dict[str, PlainHistogram] = field(default_factory=dict)
    groups: GroupReader = field(default_factory=GroupReader)


def _histogram(name: str, doc: str, label: str | None, values: dict[str, PlainHistogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    for key, hist in values.items():
        family.add_metric([key] if label else [], hist.cumulative(), hist.total)
    return family


class LiveCollector(Collector):
    """Reads the Bus, hub and worker figures when Prometheus scrapes."""

    def __init__(self, sources: Sources, backend: str, types: TypeLabels | None = None,
                 max_groups: int = DEFAULT_MAX_GROUPS) -> None:
        self.sources = sources
        self.backend = backend
        self.types = types or TypeLabels()
        self.max_groups = max_groups

    def collect(self) -> Iterator[Metric]:
        """Yield the current figures (nothing for a source that is not running)."""
        src = self.sources
        if src.bus is not None:
            s = src.bus.stats
            for name, doc, value in (
                ("bus_deliveries", "Deliveries handed to handlers of this process", s.delivered),
                ("bus_redeliveries", "Deliveries with attempt > 1", s.redelivered),
                ("bus_nacks", "Deliveries nacked for retry", s.nacked),
                ("bus_dead_letters", "Messages moved to a dead-letter subject", s.dead_lettered),
                ("bus_handler_errors", "Handler calls that raised", s.handler_errors),
                ("bus_gaps", "Messages a slow consumer lost (reported by the backend)", s.gaps),
            ):
                yield CounterMetricFamily(f"squadbus_{name}", doc, value=value)
            if isinstance(src.bus.backend, ReportsFigures):
                for key, figure in sorted(src.bus.backend.figures().items()):
                    yield GaugeMetricFamily(f"squadbus_backend_{key}", f"{key} (see the backend's docs)",
                                            value=figure)
            if isinstance(src.bus.backend, DescribesGroups) and src.groups.up is not None:
                yield from _group_families(src.groups, self.max_groups)
        if src.hub is not None:
            hub = src.hub
            yield GaugeMetricFamily("squadbus_sse_viewers", "Connected SSE viewers", value=hub.viewer_count)
            yield GaugeMetricFamily("squadbus_sse_executions", "Executions with at least one viewer",
                                    value=hub.feed_count)
            st = hub.stats
            for name, doc, value in (
                ("sse_frames", "Message frames queued to viewers", st.frames_fanned_out),
                ("sse_frames_dropped", "Frames dropped for a full viewer queue (caught up from the store)",
                 st.frames_dropped),
                ("sse_catchups", "Times a viewer caught up from the store after falling behind",
                 st.viewer_catchups),
                ("sse_gaps", "gap events sent (rows removed by retention)", st.gaps_sent),
                ("sse_store_reads", "Store reads made by SSE feeds and viewers", st.store_reads),
            ):
                yield CounterMetricFamily(f"squadbus_{name}", doc, value=value)
        if src.analytics is not None:
            fig = src.analytics.figures
            consumed = CounterMetricFamily(
                "squadbus_messages_consumed", "Messages seen by the analytics consumer group",
                labels=["message_type", "backend"],
            )
            folded: dict[str, float] = {}
            for message_type, count in fig.by_type.items():
                label = self.types(message_type)
                folded[label] = folded.get(label, 0) + count
            for label, total in sorted(folded.items()):
                consumed.add_metric([label, self.backend], total)
            yield consumed
            yield _histogram("squadbus_response_time_seconds", "Time from a question to its reply", None,
                             {"": fig.response_time})
            yield GaugeMetricFamily("squadbus_agents_tracked", "Agents with recorded activity",
                                    value=len(fig.agents))
            evicted = CounterMetricFamily("squadbus_analytics_evicted", "Entries evicted from bounded tracking",
                                          labels=["what"])
            evicted.add_metric(["agents"], fig.agents_evicted)
            evicted.add_metric(["questions"], fig.questions_evicted)
            yield evicted
        if src.latencies:
            yield _histogram("squadbus_handler_latency_seconds", "Handler time of in-process workers", "worker",
                             src.latencies)


class ServiceMetrics:
    """The metrics of one app: a private registry plus the service's own counters."""

    def __init__(self, backend: str, *, max_types: int = DEFAULT_MAX_TYPES,
                 max_groups: int = DEFAULT_MAX_GROUPS) -> None:
        self.backend = backend
        self.types = TypeLabels(max_types)
        self.registry = CollectorRegistry()
        self.sources = Sources()
        self.published = Counter(
            "squadbus_messages_published", "Messages sent through the HTTP API",
            ["message_type", "backend"], registry=self.registry,
        )
        self.stored = Counter(
            "squadbus_messages_stored", "Rows returned by committed store writes of this process (duplicates too)",
            ["message_type", "worker"], registry=self.registry,
        )
        self.lag = Histogram(
            "squadbus_consumer_lag_seconds", "Time from a message's created_at to its commit in the store",
            ["worker"], buckets=LAG_BUCKETS, registry=self.registry,
        )
        self.publish_latency = Histogram(
            "squadbus_publish_latency_seconds", "Time of one publish call of the HTTP API until the backend stored it",
            ["backend"], buckets=PUBLISH_BUCKETS, registry=self.registry,
        ).labels(backend)
        self.dead_letters = Counter(
            "squadbus_dead_letters", "Dead letters seen by this process's db-writer, by group",
            ["group"], registry=self.registry,
        )
        self.groups = TypeLabels(max_groups)
        info = GaugeMetricFamily("squadbus_info", "The service's backend and squadbus version (always 1)",
                                 labels=["backend", "version"])
        info.add_metric([label_text(backend), __version__], 1)
        self.registry.register(_Fixed([info]))
        self.registry.register(LiveCollector(self.sources, backend, self.types, max_groups))
        # labels() is a locked dict lookup with validation: keep the children at hand (keyed by label: bounded)
        self._stored_children: dict[tuple[str, str], Any] = {}
        self._published_children: dict[str, Any] = {}
        self._lag_children: dict[str, Any] = {}

    def record_stored(self, rows: Sequence[StoredMessage], worker: str) -> None:
        """Count rows returned by a committed write and observe ``stored_at - created_at``.

        A duplicate returns its existing row, so it is counted again with its original lag.
        """
        lag = self._lag_children.get(worker)
        if lag is None:
            lag = self._lag_children[worker] = self.lag.labels(worker)
        for row in rows:
            key = (self.types(row.message.message_type), worker)
            counter = self._stored_children.get(key)
            if counter is None:
                counter = self._stored_children[key] = self.stored.labels(*key)
            counter.inc()
            lag.observe(max(0.0, (row.stored_at - row.message.created_at).total_seconds()))

    def record_dead_letters(self, messages: Sequence[Message]) -> None:
        """Count the messages on ``agent.dlq.<group>`` in ``dead_letters_total{group}`` (others are ignored).

        For a consumer that sees every dead letter once, such as the db-writer (which acks them unstored).
        Group labels are bounded like message types: past ``max_groups`` groups they count under ``other``.
        """
        for message in messages:
            if message.subject.startswith(_DLQ):
                self.dead_letters.labels(self.groups(message.subject[len(_DLQ):])).inc()

    def record_published(self, message_type: str) -> None:
        """Count one message sent through the HTTP API."""
        label = self.types(message_type)
        counter = self._published_children.get(label)
        if counter is None:
            counter = self._published_children[label] = self.published.labels(label, self.backend)
        counter.inc()

    @contextlib.contextmanager
    def timed_publish(self) -> Iterator[None]:
        """Observe the time the block takes in ``publish_latency_seconds`` (when it does not raise)."""
        started = time.perf_counter()
        yield
        self.publish_latency.observe(time.perf_counter() - started)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (group figures as last read by :meth:`scrape`)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def scrape(self) -> tuple[bytes, str]:
        """Read the backend's group figures if due (bounded, see :class:`GroupReader`), then render."""
        bus = self.sources.bus
        if bus is not None and isinstance(bus.backend, DescribesGroups):
            await self.sources.groups.refresh(bus.backend)
        return self.render()


class _Fixed(Collector):
    """Metric families that never change."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """The families given."""
        return iter(self._families)
