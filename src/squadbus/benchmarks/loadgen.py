"""The load generator of ``squadbus bench``: one workload, run by squadbus and by the raw client alike.

A run drives one *side* (:class:`Side`): squadbus's ``Bus.send`` into a group
handler (:class:`SquadbusSide`), or a backend's raw client doing the same work
(each ``squadbus.benchmarks.<backend>`` module builds its own). ``senders``
concurrent tasks stand for agents; each awaits its publish's ack before it
takes the next message, so ``senders=1`` is one agent awaiting every send.

* **Open loop** (``rate``): message ``i`` is due at ``start + i / rate``. A
  free sender takes the next message, waits for its due time and sends it.
  Every latency is measured from the *due* time, so a sender that fell
  behind (all senders busy, the event loop late) shows up in the figures of
  every message it delayed (no coordinated omission); how late each send
  started is reported apart as *sender lag*.
* **Max** (``rate=None``): every sender sends its next message at once;
  latency is measured from when the send started.

Per message four times are kept: due, send started, publish acked, first
seen by the handler. They become HdrHistogram percentiles (publish→ack, end
to end, sender lag), a throughput figure (messages first seen per second from
the first send to the last receipt) and a timeline of windows for the plot.
Connecting and joining the group (until a warm-up message arrives) happen
before the load and are reported as one-time costs, never in the throughput.
From the first send until the last message is seen (or the drain gives up),
the CPU and RSS of this process and of the broker are measured
(:mod:`squadbus.benchmarks.resources`).
"""

from __future__ import annotations

import array
import asyncio
import math
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from squadbus import __version__
from squadbus.benchmarks.resources import Meter, Process, Resources
from squadbus.core import subjects
from squadbus.core.backend import Delivery, Subscription
from squadbus.core.bus import Bus
from squadbus.core.tasks import cancel_and_wait

INDEX_DIGITS = 12
"""Each message's content (and each raw payload) starts with its index, zero-padded to this width."""
WARM_UP = -1
"""The index of the warm-up message that measures the group join (left out of every figure)."""
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9), ("p99.99", 99.99))
DRAIN_TIMEOUT = 60.0
"""Seconds to wait, after the last ack, for the handler to see every message before counting the rest lost."""
JOIN_TIMEOUT = 90.0
MAX_LINGER = 600.0


class BenchError(Exception):
    """A bench run that cannot go on (a failed send, a group that never delivers); one line for the CLI."""


def stamp(index: int) -> str:
    """The index prefix of a message: ``index`` in :data:`INDEX_DIGITS` characters."""
    return f"{index:0{INDEX_DIGITS}d}"


def index_of(data: str | bytes) -> int:
    """The index a content or payload starts with."""
    return int(data[:INDEX_DIGITS])


def content(index: int, size: int) -> str:
    """A message content of ``size`` characters that starts with ``index``."""
    return stamp(index) + "x" * (size - INDEX_DIGITS)


@dataclass(frozen=True, slots=True)
class Load:
    """What one line runs: ``rate`` msgs/s (None: as fast as the senders go) for ``duration`` seconds
    or ``count`` messages, ``size`` bytes of content, from ``senders`` concurrent senders."""

    rate: float | None
    duration: float
    count: int | None
    size: int
    senders: int

    @property
    def planned(self) -> int | None:
        """Messages the line sends, when known in advance (None: max mode for a duration)."""
        if self.count is not None:
            return self.count
        if self.rate is not None:
            return max(1, round(self.rate * self.duration))
        return None

    @property
    def mode(self) -> str:
        return "max" if self.rate is None else "rate"


@dataclass(frozen=True, slots=True)
class Broker:
    """What a figure was measured against: broker name and version, and the durability of an ack."""

    name: str
    version: str
    durability: str

    def line(self) -> str:
        return f"{self.name} {self.version}; {self.durability}"


class Side(Protocol):
    """One side of the comparison: something that publishes numbered messages and hands each back."""

    name: str
    """What this side does, e.g. ``redis-py 7.0: XADD awaited + XREADGROUP/XACK``."""

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        """Connect and set up; call ``deliver(index)`` for every message consumed (and acked) from now on.
        Returns one-time costs in seconds: ``connect_s`` (the client's connection), ``subscribe_s``
        (creating the group or consumer and subscribing; a client that waits for the join waits here)."""
        ...

    async def publish(self, index: int) -> None:
        """Publish message ``index``; return once the broker acknowledged it."""
        ...

    async def stop(self) -> None:
        """Close everything and remove what the side created on the server (idempotent)."""
        ...


@dataclass(slots=True)
class Target:
    """How ``squadbus bench`` runs on one backend: its squadbus URL, its raw client, its broker facts."""

    squadbus_url: Callable[[str, str], str]
    """The URL the squadbus side uses for a run tagged ``tag`` (a key prefix, a topic of its own)."""
    raw: Callable[[str, int, str], Side]
    """The raw-client side for ``(url, size, tag)``."""
    broker: Callable[[str], Awaitable[Broker]]
    """The broker's version and the durability profile of ``url`` (fails fast when it is down)."""
    cleanup: Callable[[str, str, list[Subscription]], Awaitable[None]]
    """Remove what the squadbus side of run ``tag`` left on the server."""


class SquadbusSide:
    """``Bus.send`` from the senders to one agent, consumed by a group handler with the default options."""

    def __init__(self, target: Target, url: str, size: int, tag: str, senders: int) -> None:
        self.target = target
        self.base_url = url
        self.url = target.squadbus_url(url, tag)
        self.size = size
        self.tag = tag
        self.agent = f"bench-{tag}"
        self.name = f"squadbus {__version__}: Bus.send x{senders} -> group handler"
        self._bus: Bus | None = None
        self._subs: list[Subscription] = []
        self._filler = "x" * (size - INDEX_DIGITS)

    async def start(self, deliver: Callable[[int], None]) -> dict[str, float]:
        t0 = time.perf_counter()
        bus = self._bus = await Bus.from_url(self.url).start()
        connected = time.perf_counter()

        async def handler(delivery: Delivery) -> None:
            deliver(index_of(delivery.message.content))

        self._subs.append(await bus.subscribe(subjects.direct(self.agent), handler, group=f"bench-{self.tag}"))
        return {"connect_s": connected - t0, "subscribe_s": time.perf_counter() - connected}

    async def publish(self, index: int) -> None:
        assert self._bus is not None
        await self._bus.send("bench", self.agent, stamp(index) + self._filler)

    async def stop(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            await bus.close()
            await self.target.cleanup(self.base_url, self.tag, self._subs)


@dataclass(slots=True)
class Timeline:
    """The four times of every message (``perf_counter`` seconds; NaN until it happened)."""

    due: array.array[float] = field(default_factory=lambda: array.array("d"))
    started: array.array[float] = field(default_factory=lambda: array.array("d"))
    acked: array.array[float] = field(default_factory=lambda: array.array("d"))
    seen: array.array[float] = field(default_factory=lambda: array.array("d"))

    def grow(self, size: int) -> None:
        """Room for indexes below ``size``."""
        missing = size - len(self.due)
        if missing > 0:
            blank = array.array("d", [math.nan]) * max(missing, len(self.due))
            for column in (self.due, self.started, self.acked, self.seen):
                column.extend(blank)


@dataclass(slots=True)
class Latency:
    """HdrHistogram percentiles of one latency, in milliseconds (recorded in microseconds, 3 digits)."""

    count: int
    figures: dict[str, float]

    @classmethod
    def of(cls, values_s: list[float]) -> Latency:
        # Imported here: the CLI imports this module, and hdrhistogram is in the bench and dev extras only.
        from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

        hist = HdrHistogram(1, 3_600_000_000, 3)
        for value in values_s:
            hist.record_value(max(1, round(value * 1e6)))
        if not values_s:
            return cls(0, {name: math.nan for name, _ in (*PERCENTILES, ("max", 0))})
        figures = {name: hist.get_value_at_percentile(q) / 1000 for name, q in PERCENTILES}
        figures["max"] = hist.get_max_value() / 1000
        return cls(len(values_s), figures)

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, **{k: _round(v) for k, v in self.figures.items()}}


def _round(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


@dataclass(slots=True)
class Line:
    """The measured figures of one side for one load."""

    name: str
    side: str
    load: Load
    broker: Broker
    sent: int
    acked: int
    seen: int
    duplicates: int
    seconds: float
    one_time_s: dict[str, float]
    publish_ack: Latency
    end_to_end: Latency
    sender_lag: Latency
    windows: list[dict[str, float | None]]
    resources: Resources | None = None
    """CPU and RSS of client and broker from the first send to the last receipt (None: not measured)."""

    @property
    def throughput(self) -> float:
        return self.seen / self.seconds if self.seconds > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "side": self.side,
            "senders": self.load.senders,
            "mode": self.load.mode,
            "offered_rate": self.load.rate,
            "broker": {"name": self.broker.name, "version": self.broker.version,
                       "durability": self.broker.durability},
            "sent": self.sent,
            "acked": self.acked,
            "received": self.seen,
            "lost": self.acked - min(self.seen, self.acked),
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 4),
            "msgs_per_s": _round(self.throughput, 1),
            "one_time_s": {k: round(v, 4) for k, v in self.one_time_s.items()},
            "publish_ack_ms": self.publish_ack.as_dict(),
            "end_to_end_ms": self.end_to_end.as_dict(),
            "sender_lag_ms": self.sender_lag.as_dict(),
            "resources": None if self.resources is None else self.resources.as_dict(),
            "timeline": self.windows,
        }


class Progress:
    """A one-line progress bar on a stream (stderr), redrawn a few times a second; silent when off."""

    WIDTH = 24

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def show(self, label: str, fraction: float, detail: str) -> None:
        if self.stream is None:
            return
        filled = round(self.WIDTH * min(1.0, max(0.0, fraction)))
        self.stream.write(f"\r{label[:48]:48} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {detail}\x1b[K")
        self.stream.flush()

    def done(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


async def measure(side: Side, load: Load, broker: Broker, *, label: str, progress: Progress,
                  meter: Meter | None = None) -> Line:
    """Run ``load`` through ``side`` and measure it (see the module docstring), with ``meter`` (when
    given) measuring CPU and memory over the load and the drain. The side is stopped."""
    timeline = Timeline()
    planned = load.planned
    timeline.grow(planned if planned is not None else 1024)
    seen = 0
    duplicates = 0
    warm = asyncio.Event()
    all_seen = asyncio.Event()
    target = [math.inf]  # messages acked once sending ended: the count the handler must reach
    resources = None

    def deliver(index: int) -> None:
        nonlocal seen, duplicates
        if index < 0:
            warm.set()
            return
        if index >= len(timeline.seen) or not math.isnan(timeline.seen[index]):
            duplicates += 1
            return
        timeline.seen[index] = time.perf_counter()
        seen += 1
        if seen >= target[0]:
            all_seen.set()

    try:
        costs = await side.start(deliver)
        t0 = time.perf_counter()
        await side.publish(WARM_UP)
        try:
            await asyncio.wait_for(warm.wait(), JOIN_TIMEOUT)
        except TimeoutError:
            raise BenchError(f"{side.name}: the warm-up message did not arrive within {JOIN_TIMEOUT:.0f} s") from None
        costs["join_s"] = time.perf_counter() - t0
        if meter is not None:
            meter.start()
        sent, acked, first, ended = await _drive(side, load, timeline, progress, label, lambda: seen)
        target[0] = acked
        if seen < acked:
            with_progress = asyncio.create_task(_show_drain(progress, label, lambda: seen, acked))
            try:
                await asyncio.wait_for(all_seen.wait(), DRAIN_TIMEOUT)
            except TimeoutError:
                pass  # what never arrived is reported as lost
            finally:
                await cancel_and_wait(with_progress)
        if meter is not None:
            resources = await meter.stop(seen)
        progress.done()
    finally:
        if meter is not None:
            await meter.cancel()
        await side.stop()
    seen_times = [t for t in timeline.seen[:sent] if not math.isnan(t)]
    last = max(seen_times) if seen_times else ended
    return Line(
        name=f"{label}",
        side=side.name,
        load=load,
        broker=broker,
        sent=sent,
        acked=acked,
        seen=seen,
        duplicates=duplicates,
        seconds=last - first,
        one_time_s=costs,
        publish_ack=Latency.of(_spans(timeline.due, timeline.acked, sent)),
        end_to_end=Latency.of(_spans(timeline.due, timeline.seen, sent)),
        sender_lag=Latency.of(_spans(timeline.due, timeline.started, sent)),
        windows=_windows(timeline, sent, first, last),
        resources=resources,
    )


async def _drive(side: Side, load: Load, timeline: Timeline, progress: Progress, label: str,
                 seen: Callable[[], int]) -> tuple[int, int, float, float]:
    """The senders; returns messages sent, acked, the start time and when the last ack came."""
    rate, planned = load.rate, load.planned
    next_index = 0
    acked = 0
    failure: list[BaseException] = []
    start = time.perf_counter() + 0.005
    deadline = start + (load.duration if planned is None else MAX_LINGER)
    interval = 0.0 if rate is None else 1.0 / rate

    async def sender() -> None:
        nonlocal next_index, acked
        while not failure:
            index = next_index
            if (planned is not None and index >= planned) or (planned is None and time.perf_counter() >= deadline):
                return
            next_index += 1
            timeline.grow(index + 1)
            if rate is not None:
                due = start + index * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                began = time.perf_counter()
            else:
                due = began = time.perf_counter()
            timeline.due[index] = due
            timeline.started[index] = began
            try:
                await side.publish(index)
            except Exception as exc:  # one failed send ends the run: the CLI reports it in one line
                failure.append(exc)
                return
            timeline.acked[index] = time.perf_counter()
            acked += 1

    async def report() -> None:
        while True:
            elapsed = time.perf_counter() - start
            fraction = next_index / planned if planned else elapsed / max(load.duration, 1e-9)
            progress.show(label, fraction, f"{acked} acked {seen()} seen {elapsed:5.1f} s")
            await asyncio.sleep(0.2)

    delay = start - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(sender() for _ in range(load.senders)))
    finally:
        await cancel_and_wait(reporter)
    if failure:
        exc = failure[0]
        raise BenchError(f"{side.name}: a send failed after {acked} acks: {type(exc).__name__}: {exc}") from exc
    acks = [t for t in timeline.acked[:next_index] if not math.isnan(t)]
    return next_index, acked, start, max(acks) if acks else time.perf_counter()


async def _show_drain(progress: Progress, label: str, seen: Callable[[], int], acked: int) -> None:
    while True:
        progress.show(label, 1.0, f"draining: {seen()} of {acked} seen")
        await asyncio.sleep(0.2)


def _spans(begin: array.array[float], end: array.array[float], count: int) -> list[float]:
    return [e - b for b, e in zip(begin[:count], end[:count], strict=True) if not math.isnan(e) and not math.isnan(b)]


def _windows(timeline: Timeline, sent: int, first: float, last: float) -> list[dict[str, float | None]]:
    """Per time window (about 60 over the run): messages seen per second and end-to-end percentiles of
    the messages *due* in the window (so a stall shows where it began)."""
    span = max(last - first, 1e-6)
    width = max(0.05, span / 60)
    buckets = max(1, int(span / width))  # the last window takes the rest: between one and two widths
    per_due: list[list[float]] = [[] for _ in range(buckets)]
    seen_count = [0] * buckets
    for due, seen in zip(timeline.due[:sent], timeline.seen[:sent], strict=True):
        if math.isnan(seen) or math.isnan(due):
            continue
        per_due[min(buckets - 1, max(0, int((due - first) / width)))].append(seen - due)
        seen_count[min(buckets - 1, max(0, int((seen - first) / width)))] += 1
    out: list[dict[str, float | None]] = []
    for i in range(buckets):
        values = sorted(per_due[i])
        covered = span - i * width if i == buckets - 1 else width
        out.append({
            "t_s": round(i * width, 3),
            "msgs_per_s": round(seen_count[i] / max(covered, 1e-3), 1),
            "e2e_p50_ms": _pick(values, 0.50),
            "e2e_p99_ms": _pick(values, 0.99),
            "e2e_max_ms": _pick(values, 1.0),
        })
    return out


def _pick(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] * 1000, 3)


@dataclass(slots=True)
class Comparison:
    """squadbus and the raw client under the same load: one pattern of one round."""

    senders: int
    round: int
    raw: Line
    squadbus: Line

    def ratios(self) -> dict[str, float | None]:
        """squadbus over raw: throughput (>1: squadbus moved more), and e2e p50 / p99 (>1: squadbus slower)."""
        def over(a: float | None, b: float | None) -> float | None:
            if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
                return None
            return round(a / b, 3)

        return {
            "throughput": over(self.squadbus.throughput, self.raw.throughput),
            "e2e_p50": over(self.squadbus.end_to_end.figures["p50"], self.raw.end_to_end.figures["p50"]),
            "e2e_p99": over(self.squadbus.end_to_end.figures["p99"], self.raw.end_to_end.figures["p99"]),
        }

    def as_dict(self) -> dict[str, Any]:
        return {"senders": self.senders, "round": self.round, "raw": self.raw.as_dict(),
                "squadbus": self.squadbus.as_dict(), "ratio": self.ratios()}


async def compare(target: Target, url: str, load: Load, broker: Broker, *, round_: int,
                  progress: Progress, broker_process: Process | None = None) -> Comparison:
    """The raw side then squadbus (squadbus first in odd rounds, so drift hits both alike), same load;
    with ``broker_process``, CPU and memory of this process and the broker over each line."""
    raw_tag, our_tag = secrets.token_hex(4), secrets.token_hex(4)
    lines: dict[str, Line] = {}
    order = ("raw", "squadbus") if round_ % 2 == 0 else ("squadbus", "raw")
    for which in order:
        side: Side = (target.raw(url, load.size, raw_tag) if which == "raw"
                      else SquadbusSide(target, url, load.size, our_tag, load.senders))
        label = f"{which} x{load.senders} round {round_ + 1}"
        meter = None if broker_process is None else Meter(broker_process)
        lines[which] = await measure(side, load, broker, label=label, progress=progress, meter=meter)
    return Comparison(load.senders, round_, lines["raw"], lines["squadbus"])


def progress_stream(setting: bool | None) -> TextIO | None:
    """stderr when ``setting`` is True, or when it is None and stderr is a terminal; else None."""
    if setting is None:
        setting = sys.stderr.isatty()
    return sys.stderr if setting else None


def format_report(comparisons: list[Comparison], broker: Broker, load: Load) -> str:
    """The human table: per pattern and round, raw and squadbus, percentiles in ms, ratios."""
    what = "as fast as the senders go" if load.rate is None else f"open loop at {load.rate:g} msgs/s"
    out = [f"broker: {broker.line()}",
           f"load: {what}, {load.size} B content, "
           + (f"{load.count} messages" if load.count is not None else f"{load.duration:g} s")
           + " per line; latency from the intended send time (HdrHistogram)"]
    head = (f"{'line':58} {'msgs/s':>9} {'lost':>5} | {'e2e p50':>8} {'p99':>8} {'p99.9':>8} {'p99.99':>8} "
            f"{'max':>8} | {'ack p50':>8} {'p99':>8} {'max':>8} | {'lag p99':>8} {'max':>8}")
    for comparison in comparisons:
        out += ["", f"{comparison.senders} senders, round {comparison.round + 1}, against {broker.line()}",
                head, "-" * len(head)]
        for line in (comparison.raw, comparison.squadbus):
            e, a, g = line.end_to_end.figures, line.publish_ack.figures, line.sender_lag.figures
            lost = line.acked - min(line.seen, line.acked)
            out.append(
                f"{line.side[:58]:58} {line.throughput:>9.0f} {lost:>5} | "
                f"{_ms(e['p50'])} {_ms(e['p99'])} {_ms(e['p99.9'])} {_ms(e['p99.99'])} {_ms(e['max'])} | "
                f"{_ms(a['p50'])} {_ms(a['p99'])} {_ms(a['max'])} | {_ms(g['p99'])} {_ms(g['max'])}"
            )
        r = comparison.ratios()
        out.append(f"  ratio squadbus/raw: throughput {_ratio(r['throughput'])}, e2e p50 {_ratio(r['e2e_p50'])}, "
                   f"e2e p99 {_ratio(r['e2e_p99'])} (round {comparison.round + 1}, {comparison.senders} senders)")
        for line in (comparison.raw, comparison.squadbus):
            costs = ", ".join(f"{k.removesuffix('_s')} {v * 1000:.1f} ms" for k, v in line.one_time_s.items())
            out.append(f"  one-time, not in throughput: {line.side.split(':')[0]}: {costs}")
        for line in (comparison.raw, comparison.squadbus):
            if line.resources is not None:
                out.append(f"  cpu and memory: {line.side.split(':')[0]}: {line.resources.line()}")
    out.append(f"\nall figures against {broker.line()}")
    return "\n".join(out)


def _ms(value: float) -> str:
    return f"{'-':>8}" if math.isnan(value) else f"{value:>8.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
