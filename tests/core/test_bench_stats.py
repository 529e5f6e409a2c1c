"""The benchmark arithmetic every bench reports with: percentiles, medians, paired ratios."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest

from squadbus.benchmarks.stats import Result, interleaved_rounds, median_of, paired_ratio, percentile


def _line(*rates: float) -> list[Result]:
    return [Result("line", 1000, 1000 / rate) for rate in rates]


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 0.999)) == (50.0, 99.0, 100.0)
    assert math.isnan(percentile([], 0.5))


def test_paired_ratio_takes_the_median_of_per_round_ratios() -> None:
    # The baseline drifts 2x between rounds; each round's ratio cancels it, a ratio of medians would not.
    baseline = _line(100, 200, 100, 200, 100)
    ours = _line(80, 170, 90, 180, 70)
    middle, ratios = paired_ratio(ours, baseline)
    assert ratios == pytest.approx([0.8, 0.85, 0.9, 0.9, 0.7])
    assert middle == pytest.approx(0.85)
    assert paired_ratio(_line(90, 60), _line(100, 100))[0] == pytest.approx(0.75)  # even count: the mean of two
    with pytest.raises(ValueError):
        paired_ratio(_line(1, 2), _line(1))


def test_median_of_notes_every_round() -> None:
    chosen = median_of(_line(300, 100, 200))
    assert chosen.throughput == pytest.approx(200)
    assert "300, 100, 200" in chosen.notes


async def test_interleaved_rounds_alternate_the_lines() -> None:
    order: list[str] = []

    def run(name: str, rate: float) -> Callable[[], Awaitable[Result]]:
        async def once() -> Result:
            order.append(name)
            return Result(name, 1000, 1000 / rate)
        return once

    a, b = await interleaved_rounds(3, run("a", 10), run("b", 20))
    assert order == ["a", "b"] * 3
    assert [r.name for r in a] == ["a"] * 3 and [r.throughput for r in b] == pytest.approx([20] * 3)
    assert Result("x", 1, 1.0, ratio=0.5).summary()["ratio"] == 0.5
    assert "ratio" not in Result("x", 1, 1.0).summary()
