"""The ``--plot`` of ``squadbus bench``: latency percentiles and throughput over time, one PNG.

One column per compared pattern (senders, round); the top row is end-to-end
latency (p50, p99, max of the messages *due* in each window, from the
intended send time), the bottom row messages seen per second; raw client
dashed, squadbus solid, each throughput line labelled with its client's and
broker's CPU. Needs matplotlib (``pip install 'squadbus[bench]'``);
drawn with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from squadbus.benchmarks.loadgen import Broker, Comparison, Line


def plot(comparisons: Sequence[Comparison], broker: Broker, path: Path) -> None:
    """Write the figure of ``comparisons`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = max(1, len(comparisons))
    figure, axes = pyplot.subplots(2, columns, figsize=(6 * columns, 7), squeeze=False, sharex="col")
    for column, comparison in enumerate(comparisons):
        latency, rate = axes[0][column], axes[1][column]
        for line, style in ((comparison.raw, "--"), (comparison.squadbus, "-")):
            _draw(latency, rate, line, style)
        latency.set_title(f"{comparison.senders} senders, round {comparison.round + 1}", fontsize=10)
        latency.set_yscale("log")
        latency.set_ylabel("end to end, ms (from intended send)")
        rate.set_ylabel("messages seen / s")
        rate.set_xlabel("seconds into the run")
        latency.legend(fontsize=7)
        rate.legend(fontsize=7)
        latency.grid(True, which="both", alpha=0.3)
        rate.grid(True, alpha=0.3)
    load = comparisons[0].raw.load if comparisons else None
    what = "" if load is None else (" — max throughput" if load.rate is None else f" — open loop {load.rate:g}/s")
    figure.suptitle(f"squadbus bench{what}\n{broker.line()}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=100)
    pyplot.close(figure)


def _draw(latency: object, rate: object, line: Line, style: str) -> None:
    times = [w["t_s"] for w in line.windows]
    who = line.side.split(":")[0]
    for key, label, colour in (("e2e_p50_ms", "p50", "tab:blue"), ("e2e_p99_ms", "p99", "tab:orange"),
                               ("e2e_max_ms", "max", "tab:red")):
        values = [w[key] for w in line.windows]
        latency.plot(times, [float("nan") if v is None else v for v in values], style,  # type: ignore[attr-defined]
                     color=colour, label=f"{who} {label}", linewidth=1)
    rate.plot(times, [w["msgs_per_s"] for w in line.windows], style,  # type: ignore[attr-defined]
              color="tab:green" if style == "-" else "tab:gray", label=who + _cpu(line), linewidth=1)


def _cpu(line: Line) -> str:
    """The line's CPU beside its throughput: client and broker, % of one core (empty when not measured)."""
    if line.resources is None:
        return ""
    figures = line.resources.as_dict()
    client, broker = figures["client"]["cpu_pct"], figures["broker"]["cpu_pct"]
    return f" (CPU: client {client:.0f}%" + ("" if broker is None else f", broker {broker:.0f}%") + " of a core)"
