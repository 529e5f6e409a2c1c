"""1,000 concurrent SSE viewers on one ``squadbus serve`` process at 1,000 msgs/s, beside a bare SSE server.

    python bench/bench_sse.py [--count 5000] [--rate 1000] [--viewers 1000] [--executions 100 1000]

Starts ``squadbus serve`` (memory:// bus, SQLite file store in a temp dir, all
four workers, open on 127.0.0.1) and the bare asyncio SSE fan-out server
(``python -m squadbus.benchmarks.sse PORT``) as child processes, then for each
``--executions`` value connects the viewers (spread evenly over that many
executions), POSTs ``--count`` messages at ``--rate`` per second and measures
delivery latency from each message's intended send time to its arrival at
each viewer. Target: p99 < 50 ms and no viewer misses an event.
Prints a table, the ratios and a JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from squadbus.benchmarks.sse import run
from squadbus.benchmarks.stats import Environment, Result, format_table, ratio, to_json
from squadbus.testing.servers.process import free_port, port_open, spawn, stop, wait_until

TARGET_P99_MS = 50.0


async def main_async(count: int, rate: float, viewers: int, executions: list[int], tmp: Path) -> list[Result]:
    serve_port, raw_port = free_port(), free_port()
    serve = spawn([sys.executable, "-m", "squadbus", "serve", "--port", str(serve_port),
                   "--store", f"sqlite+aiosqlite:///{tmp / 'bench.db'}", "--audit-path", str(tmp / "audit.jsonl"),
                   "--log-level", "warning"], tmp / "serve.log")
    raw = spawn([sys.executable, "-m", "squadbus.benchmarks.sse", str(raw_port)], tmp / "raw.log")
    results: list[Result] = []
    try:
        wait_until(lambda: port_open(serve_port), 30, "squadbus serve", serve)
        wait_until(lambda: port_open(raw_port), 30, "raw SSE server", raw)
        for n in executions:
            results += await run(url=f"http://127.0.0.1:{serve_port}", count=count, rate=rate, viewers=viewers,
                                 executions=n, raw_url=f"http://127.0.0.1:{raw_port}")
    finally:
        stop(serve)
        stop(raw)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5_000, help="messages per run")
    parser.add_argument("--rate", type=float, default=1_000.0, help="open-loop POST rate (msgs/s)")
    parser.add_argument("--viewers", type=int, default=1_000, help="concurrent SSE viewers")
    parser.add_argument("--executions", type=int, nargs="+", default=[1_000, 100],
                        help="executions the viewers are spread over (fan-out = viewers / executions)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="squadbus-bench-sse-") as tmp:
        results = asyncio.run(main_async(args.count, args.rate, args.viewers, args.executions, Path(tmp)))
    out = sys.stdout
    out.write(format_table(results) + "\n\n")
    for r in results:
        out.write(f"{r.name}: {r.notes}\n")
    for ours, raw in zip(results[::2], results[1::2], strict=True):
        p99 = ours.summary()["p99_ms"]
        verdict = "meets" if isinstance(p99, float) and p99 < TARGET_P99_MS and "missed=0 " in ours.notes \
            else "MISSES"
        out.write(f"{ours.notes.split(' sent_in')[0]}: squadbus p99 {p99} ms ({verdict} target p99 < "
                  f"{TARGET_P99_MS:.0f} ms, no misses); throughput ratio squadbus/raw {ratio(ours, raw):.2f}\n")
    out.write(to_json(results, environment=Environment.current().as_dict(), count=args.count, rate=args.rate,
                      viewers=args.viewers) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
