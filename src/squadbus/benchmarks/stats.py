"""Latency percentiles, throughput and the one report format every benchmark prints."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest-rank."""
    if not sorted_values:
        return math.nan
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass(slots=True)
class Result:
    """One measured line: ``name`` did ``count`` operations in ``seconds``."""

    name: str
    count: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    notes: str = ""
    ratio: float | None = None
    """Set on a line compared with a baseline: its ratio (how it was taken is in ``notes``)."""

    @property
    def throughput(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> dict[str, float | int | str | None]:
        """The line as plain values; the latency percentiles are None for a line without samples
        (a closed-loop throughput run measures msgs/s only: see :mod:`.openloop`)."""
        lat = sorted(self.latencies_ms)
        return {
            "name": self.name,
            "count": self.count,
            "seconds": round(self.seconds, 4),
            "msgs_per_s": round(self.throughput, 1),
            "p50_ms": round(percentile(lat, 0.50), 3) if lat else None,
            "p99_ms": round(percentile(lat, 0.99), 3) if lat else None,
            "p999_ms": round(percentile(lat, 0.999), 3) if lat else None,
            "notes": self.notes,
            **({} if self.ratio is None else {"ratio": round(self.ratio, 3)}),
        }


def ratio(ours: Result, baseline: Result) -> float:
    """Throughput of ``ours`` over ``baseline``."""
    return ours.throughput / baseline.throughput if baseline.throughput else math.nan


def median_of(rounds: Sequence[Result]) -> Result:
    """The round with the median throughput, its notes listing every round (shared machines are noisy)."""
    ordered = sorted(rounds, key=lambda r: r.throughput)
    chosen = ordered[len(ordered) // 2]
    spread = ", ".join(f"{r.throughput:.0f}" for r in rounds)
    chosen.notes = f"{chosen.notes}; median of {len(rounds)} rounds: {spread} msgs/s".lstrip("; ")
    return chosen


async def interleaved_rounds(rounds: int, *runs: Callable[[], Awaitable[Result]]) -> list[list[Result]]:
    """Run every one of ``runs`` once per round, ``rounds`` times; each one's rounds, in the order given.
    Interleaving makes drift of a shared machine hit every line alike."""
    results: list[list[Result]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, out in zip(runs, results, strict=True):
            out.append(await run())
    return results


async def interleaved_medians(rounds: int, *runs: Callable[[], Awaitable[Result]]) -> list[Result]:
    """:func:`interleaved_rounds`, each line reduced to its median round."""
    return [median_of(out) for out in await interleaved_rounds(rounds, *runs)]


def paired_ratio(ours: Sequence[Result], baseline: Sequence[Result]) -> tuple[float, list[float]]:
    """The median of the per-round throughput ratios ``ours[i] / baseline[i]``, and those ratios.

    Rounds ``i`` of two interleaved lines ran seconds apart, so each round's ratio
    cancels the machine's drift between rounds (on a shared VM the raw baseline
    alone moved 2x within minutes), which a ratio of two medians does not.
    """
    ratios = [ratio(o, b) for o, b in zip(ours, baseline, strict=True)]
    ordered = sorted(ratios)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median, ratios


async def abba(
    first: Callable[[], Awaitable[Result]], second: Callable[[], Awaitable[Result]]
) -> tuple[Result, Result]:
    """Run ``first, second, second, first`` and merge each one's two runs (samples pooled): drift of
    the machine or the broker over the four runs hits both alike, whichever order would favour."""
    a1 = await first()
    b1 = await second()
    b2 = await second()
    a2 = await first()
    return merged(a1, a2), merged(b1, b2)


def merged(one: Result, two: Result) -> Result:
    """Two runs of the same line as one: counts, times and latency samples added up."""
    notes = f"{one.notes}; two runs pooled".lstrip("; ")
    return Result(one.name, one.count + two.count, one.seconds + two.seconds,
                  one.latencies_ms + two.latencies_ms, notes)


def format_table(results: Sequence[Result]) -> str:
    """A fixed-width table of results (msgs/s and latency percentiles, ``-`` for a line without samples)."""
    header = f"{'benchmark':44} {'count':>8} {'msgs/s':>11} {'p50 ms':>9} {'p99 ms':>9} {'p99.9 ms':>9}"
    lines = [header, "-" * len(header)]
    for r in results:
        s = {k: "-" if v is None else v for k, v in r.summary().items()}
        lines.append(
            f"{r.name:44} {r.count:>8} {s['msgs_per_s']:>11} {s['p50_ms']:>9} {s['p99_ms']:>9} {s['p999_ms']:>9}"
            + (f"  {r.notes}" if r.notes else "")
        )
    return "\n".join(lines)


def to_json(results: Sequence[Result], **extra: object) -> str:
    """Results (without raw samples) and ``extra`` facts as one JSON document."""
    return json.dumps({"results": [r.summary() for r in results], **extra}, indent=2, default=str)


@dataclass(frozen=True, slots=True)
class Environment:
    """Where a benchmark ran, printed with its numbers."""

    python: str
    machine: str
    cpus: int

    @classmethod
    def current(cls) -> Environment:
        import os
        import platform
        import sys

        return cls(python=sys.version.split()[0], machine=platform.machine(), cpus=os.cpu_count() or 0)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
