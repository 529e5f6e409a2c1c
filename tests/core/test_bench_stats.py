"""The benchmark arithmetic every bench reports with: percentiles, medians, paired ratios."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from click.testing import CliRunner

from squadbus.benchmarks.stats import (
    Result,
    format_table,
    interleaved_rounds,
    median_of,
    paired_ratio,
    percentile,
    to_json,
)
from squadbus.cli.bench import bench


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


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_line_without_latency_samples_shows_none_not_nan() -> None:
    burst = Result("closed-loop burst", 1000, 0.5)
    timed = Result("open loop", 3, 1.0, [1.0, 2.0, 3.0])
    assert {k: burst.summary()[k] for k in ("p50_ms", "p99_ms", "p999_ms")} == dict.fromkeys(
        ("p50_ms", "p99_ms", "p999_ms"))
    header, _, burst_row, timed_row = format_table([burst, timed]).splitlines()
    assert "nan" not in burst_row.lower()
    assert burst_row.split()[-3:] == ["-", "-", "-"]
    assert timed_row.split()[-3:] == ["2.0", "3.0", "3.0"]
    assert header.split()[-2:] == ["p99.9", "ms"]
    rows = _strict_json(to_json([burst, timed]))["results"]
    assert rows[0]["p50_ms"] is None and rows[1]["p50_ms"] == 2.0


def test_bench_cli_every_open_loop_line_has_samples_and_bursts_have_none() -> None:
    # --rate 0.4 asks for fewer than one open-loop message per second of the two-second run.
    result = CliRunner().invoke(bench, ["--url", "memory://", "--suite", "--count", "200", "--rate", "0.4", "--json"])
    assert result.exit_code == 0, result.output
    rows = _strict_json(result.output)["results"]
    open_loop = [row for row in rows if "open loop" in row["name"]]
    bursts = [row for row in rows if "open loop" not in row["name"]]
    assert len(open_loop) == 2 and bursts
    assert all(isinstance(row["p50_ms"], float) and row["p50_ms"] <= row["p999_ms"] for row in open_loop)
    assert all(row[k] is None for row in bursts for k in ("p50_ms", "p99_ms", "p999_ms"))


@pytest.mark.parametrize("option", [["--count", "0"], ["--rate", "0"], ["--rate", "-5"]])
def test_bench_cli_refuses_counts_and_rates_it_cannot_run(option: list[str]) -> None:
    result = CliRunner().invoke(bench, ["--url", "memory://", *option])
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output
