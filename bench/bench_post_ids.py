"""POST /v1/messages with and without client-set ids, through ASGI, on SQLite and PostgreSQL.

    python bench/bench_post_ids.py [--requests 1500] [--rounds 3] [--only sqlite|postgres]

A client-set id costs the request a lookup and a claim in the store
(:mod:`squadbus.service.routes_messages`, step 3) on top of the publish and
the write-through every POST makes. This measures what that costs: one app
(memory bus, every in-process worker) per store, driven through
``httpx.ASGITransport`` one request at a time and 32 at a time, each line
with and without ids, the lines interleaved round by round. The store is a
SQLite file in a temp dir (WAL, synchronous=NORMAL) and a private PostgreSQL
15 cluster (server defaults, fsync on). Prints the median round of each line
with its p50/p99 and the range of throughput over the rounds, then the
per-round ratio "with ids / without" at 32 concurrent (target: >= 0.85).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from squadbus.benchmarks.stats import Environment, Result, format_table, interleaved_rounds, median_of, paired_ratio
from squadbus.core.settings import Settings
from squadbus.service import ServiceOptions, create_app
from squadbus.testing.servers.postgres import running_postgres

CONCURRENCY = (1, 32)
TARGET = 0.85


async def post_many(client: httpx.AsyncClient, name: str, count: int, concurrency: int, ids: bool) -> Result:
    """``count`` POSTs by ``concurrency`` closed-loop senders; every answer must be a 201."""
    latencies: list[float] = []
    remaining = iter(range(count))

    async def sender() -> None:
        for i in remaining:
            body: dict[str, object] = {"sender_id": "bench", "recipient_id": f"agent-{i % 50}", "content": f"m{i}"}
            if ids:
                body["id"] = str(uuid.uuid4())
            start = time.perf_counter()
            response = await client.post("/v1/messages", json=body)
            latencies.append((time.perf_counter() - start) * 1000)
            if response.status_code != 201:
                raise RuntimeError(f"{name}: HTTP {response.status_code} {response.text}")

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return Result(name, count, time.perf_counter() - start, latencies)


async def run_store(label: str, store_url: str, tmp: Path, requests: int, rounds: int) -> list[Result]:
    """Every line on one store; the median round of each, then the 32-concurrent ratio lines."""
    app = create_app(Settings(url="memory://", store_url=store_url),
                     options=ServiceOptions(audit_path=str(tmp / f"audit-{label}.jsonl")))
    results: list[Result] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=60) as client:
            await post_many(client, "warm-up", 200, 8, True)
            lines: list[Callable[[], Awaitable[Result]]] = []
            for concurrency in CONCURRENCY:
                count = requests if concurrency > 1 else requests // 2
                for ids in (False, True):
                    name = f"{label} c={concurrency} {'client ids' if ids else 'server ids'}"

                    def line(name: str = name, count: int = count, c: int = concurrency, ids: bool = ids
                             ) -> Awaitable[Result]:
                        return post_many(client, name, count, c, ids)

                    lines.append(line)
            every = await interleaved_rounds(rounds, *lines)
    for line_rounds in every:
        low, high = min(r.throughput for r in line_rounds), max(r.throughput for r in line_rounds)
        chosen = median_of(line_rounds)
        chosen.notes = f"range {low:.0f}-{high:.0f} POST/s over {len(line_rounds)} rounds"
        results.append(chosen)
    # lines: c=1 without, c=1 with, c=32 without, c=32 with
    for index, concurrency in ((0, 1), (2, 32)):
        median, ratios = paired_ratio(every[index + 1], every[index])
        results.append(Result(f"{label} c={concurrency} ratio ids/no ids", 0, 0.0, ratio=median,
                              notes=f"per round: {', '.join(f'{r:.2f}' for r in ratios)}"))
    return results


async def main_async(requests: int, rounds: int, only: str | None) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="squadbus-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        if only in (None, "sqlite"):
            url = f"sqlite+aiosqlite:///{tmp / 'history.db'}"
            results += await run_store("sqlite", url, tmp, requests, rounds)
        if only in (None, "postgres"):
            with running_postgres() as pg:
                results += await run_store("postgres", pg.url, tmp, requests, rounds)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1500, help="POSTs per line at 32 concurrent (half at 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("sqlite", "postgres"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = asyncio.run(main_async(args.requests, args.rounds, args.only))
    measured = [r for r in results if r.ratio is None]
    out = sys.stdout
    out.write(format_table(measured) + "\n\n")
    for r in results:
        if r.ratio is not None:
            met = "" if "c=1 " in r.name else ("  meets target" if r.ratio >= TARGET else "  MISSES target")
            out.write(f"{r.name}: {r.ratio:.2f} ({r.notes}){met}\n")
    env = Environment.current()
    out.write(f"python {env.python}, {env.machine}, {env.cpus} CPUs; memory bus, all in-process workers\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
