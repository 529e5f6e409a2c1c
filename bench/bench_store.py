"""db-writer throughput into PostgreSQL and SQLite, against the raw drivers, in one run.

    python bench/bench_store.py [--count 30000] [--rate 0] [--skip-fast]

Starts a private PostgreSQL 15 cluster (defaults: fsync on), runs the store
benchmark, restarts it with ``fsync=off synchronous_commit=off`` (labelled
"postgres-nofsync" beside every number), then runs it on a SQLite file in a
temp dir (WAL, synchronous=NORMAL). Prints a table, the ratios to the raw
driver and a JSON document. Targets: >= 20,000 msgs/s into PostgreSQL and
>= 10,000 msgs/s into SQLite through the db-writer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from squadbus.benchmarks.stats import Environment, Result, format_table, ratio, to_json
from squadbus.benchmarks.store import run
from squadbus.testing.servers.postgres import FAST_OPTIONS, running_postgres

TARGETS = {"postgres": 20_000, "postgres-nofsync": 20_000, "sqlite": 10_000}


def ratios(results: list[Result]) -> list[str]:
    lines = []
    for label, target in TARGETS.items():
        ours = next((r for r in results if r.name == f"db-writer -> {label}"), None)
        raws = [r for r in results if r.name.startswith("raw ") and r.name.endswith(f"-> {label}")]
        if ours is None:
            continue
        met = "meets" if ours.throughput >= target else "MISSES"
        lines.append(f"{ours.name}: {ours.throughput:,.0f} msgs/s ({met} target {target:,})")
        for raw in raws:
            lines.append(f"  ratio db-writer / {raw.name.split(' -> ')[0]}: {ratio(ours, raw):.2f}")
    return lines


async def main_async(count: int, rate: float, skip_fast: bool) -> list[Result]:
    results: list[Result] = []
    with running_postgres() as pg:
        results += await run(url=pg.url, count=count, rate=rate, label="postgres")
        if not skip_fast:
            pg.stop()
            pg.options = FAST_OPTIONS
            pg.start()
            db = "bench_nofsync"
            import asyncpg

            conn = await asyncpg.connect(pg.url)
            try:
                await conn.execute(f"CREATE DATABASE {db}")
            finally:
                await conn.close()
            results += await run(url=pg.url_for(db), count=count, rate=rate, label="postgres-nofsync")
    with tempfile.TemporaryDirectory(prefix="squadbus-bench-") as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        results += await run(url=url, count=count, rate=rate, label="sqlite")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30_000, help="messages per line")
    parser.add_argument("--rate", type=float, default=0.0, help="open-loop publish rate (0 = as fast as possible)")
    parser.add_argument("--skip-fast", action="store_true", help="skip the fsync=off PostgreSQL run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args.count, args.rate, args.skip_fast))
    out = sys.stdout
    out.write(format_table(results) + "\n\n")
    out.write("postgres: server defaults (fsync=on, synchronous_commit=on); postgres-nofsync: "
              "-c fsync=off -c synchronous_commit=off -c full_page_writes=off; sqlite: WAL, synchronous=NORMAL\n")
    out.write("\n".join(ratios(results)) + "\n")
    out.write(to_json(results, environment=Environment.current().as_dict(), count=args.count, rate=args.rate) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
