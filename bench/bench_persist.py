"""End-to-end persistence: a backlog on Redis or NATS written to PostgreSQL or SQLite by
``squadbus worker db-writer`` running as its own process (issue 19's first line).

    python bench/bench_persist.py [--backend redis|nats] [--store postgres|sqlite] [--count 50000]
                                  [--runs 3] [--size 1024] [--py-spy FILE] [--no-bus-alone]
                                  [--parallel-writes N]

Each run starts private servers (PostgreSQL 15 with server defaults: fsync on;
Redis with the `fast` test profile (no persistence); nats-server with file storage and
``sync_always``), publishes ``count`` messages of ``size`` bytes of content over
100 executions with ``publish_many`` (chunks of 1,000), then starts the db-writer
process. Throughput counts from the first stored row to the last (the process
start, group join and store migration are a one-time cost, printed on their own
line), polling the sum of the per-execution counters every 20 ms on one connection.
Beside it, in the same run: the store alone (``HistoryStore.write`` of the same
messages in batches of 500, no bus) on a fresh database, and the bus alone: another process
reading the same backlog in another consumer group with ``subscribe_batch`` (batches of 500,
as the db-writer) and a handler that does nothing, its CPU per message from the first batch to
the last (the db-writer's CPU is roughly the bus's plus the store's). CPU seconds of the db-writer
process, the broker and PostgreSQL (postmaster and backends) over the same span are read
from /proc, with the 1-minute load average at the end.
After each run every message is checked stored exactly once, in publish order
per execution. ``--py-spy FILE`` samples the db-writer process with py-spy (installed
apart, on PATH or in $PY_SPY) from start to the last row, collapsed stacks to
``FILE.<run>`` (``--idle`` off: on-CPU time only). ``--parallel-writes N`` (PostgreSQL) gives the
db-writer's store URL ``?parallel_writes=N`` (default: the store's default, 1); each run's figures are
printed as it ends, then worst .. best over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import asyncpg

from squadbus.benchmarks.stats import Environment
from squadbus.core import envelope
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.store import open_store
from squadbus.testing.servers.nats import NatsServer
from squadbus.testing.servers.postgres import running_postgres
from squadbus.testing.servers.redis import RedisServer

EXECUTIONS = 100
BUS_ALONE_GROUP = "bench-bus-alone"
SQUADBUS = str(Path(sys.executable).with_name("squadbus"))
STORE_BATCH = 500


def make_messages(count: int, size: int) -> list[Message]:
    executions = [uuid.uuid4() for _ in range(EXECUTIONS)]
    content = "x" * size
    return [
        envelope.build(subject=f"agent.message.dev-{i % 50}", sender_id=f"pm-{i % 7}", recipient_id=f"dev-{i % 50}",
                       content=content, message_type="task", task_execution_id=executions[i % EXECUTIONS])
        for i in range(count)
    ]


@contextmanager
def broker(kind: str, base: Path) -> Iterator[tuple[str, int]]:
    """The broker's URL and PID."""
    (base / kind).mkdir()
    server: RedisServer | NatsServer
    if kind == "redis":
        with RedisServer("fast", directory=base / "redis") as server:
            assert server.proc is not None
            yield server.url, server.proc.pid
    else:
        with NatsServer(base / "nats") as server:
            assert server.proc is not None
            yield server.url, server.proc.pid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (PostgreSQL: the postmaster and its backends)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    total = cpu_seconds(pid)
    try:
        kids = [int(k) for k in children.read_text().split()]
    except OSError:
        return total
    for kid in kids:
        with contextlib.suppress(OSError, IndexError):  # exited meanwhile
            total += cpu_seconds(kid)
    return total


class RowCounter:
    """Rows stored so far, as the sum of the per-execution counters (exact, and cheap: ``count(*)``
    over the growing table every 20 ms, on a new connection each time, loaded the database it measured)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self._pg: asyncpg.Connection | None = None
        self._sqlite: Any = None

    async def rows(self) -> int:
        if self.store_url.startswith("sqlite"):
            return await self._sqlite_rows()
        if self._pg is None:
            self._pg = await asyncpg.connect(self.store_url)
        try:
            return int(await self._pg.fetchval("SELECT coalesce(sum(last_seq), 0) FROM exec_counters"))
        except asyncpg.UndefinedTableError:
            return 0

    async def _sqlite_rows(self) -> int:
        import aiosqlite

        if self._sqlite is None:
            path = self.store_url.split("///", 1)[1]
            if not await asyncio.to_thread(Path(path).exists):
                return 0
            self._sqlite = await aiosqlite.connect(path)
        try:
            async with self._sqlite.execute("SELECT coalesce(sum(last_seq), 0) FROM exec_counters") as cur:
                row = await cur.fetchone()
        except Exception:  # table not created yet
            return 0
        return int(row[0]) if row else 0

    async def close(self) -> None:
        if self._pg is not None:
            await self._pg.close()
        if self._sqlite is not None:
            await self._sqlite.close()


async def check_stored(store_url: str, messages: list[Message]) -> None:
    """Every message once, each execution's rows in publish order."""
    async with open_store(store_url) as store:
        from squadbus.store import HistoryQuery

        seen: list[uuid.UUID] = []
        by_exec: dict[uuid.UUID | None, list[tuple[int, uuid.UUID]]] = {}
        cursor = None
        while True:
            page = await store.query(HistoryQuery(cursor=cursor, limit=1000))
            for row in page.items:
                seen.append(row.message.id)
                by_exec.setdefault(row.message.task_execution_id, []).append((row.seq, row.message.id))
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == len(messages), (len(seen), len(set(seen)), len(messages))
    position = {m.id: i for i, m in enumerate(messages)}
    for rows in by_exec.values():
        order = [position[i] for _, i in sorted(rows)]
        assert order == sorted(order), "rows out of publish order"


async def bus_alone(url: str, count: int) -> tuple[float, float]:
    """(CPU µs per message, messages/s) of this process reading ``count`` messages in batches of 500
    with a handler that does nothing (run in a child process: ``--bus-alone-child URL COUNT``)."""
    from squadbus.core.backend import ConsumerOptions

    done = asyncio.Event()
    seen = 0
    cpu_at = wall_at = 0.0

    async def handler(messages: Any) -> None:
        nonlocal seen, cpu_at, wall_at
        if not seen:
            cpu_at, wall_at = time.process_time(), time.perf_counter()
        seen += len(messages)
        if seen >= count:
            done.set()

    async with Bus.from_url(url) as bus:
        await bus.subscribe_batch("agent.>", handler, group=BUS_ALONE_GROUP, max_batch=STORE_BATCH, max_wait=0.05,
                                  options=ConsumerOptions(max_deliver=1_000_000))
        await asyncio.wait_for(done.wait(), 300)
        cpu, wall = time.process_time() - cpu_at, time.perf_counter() - wall_at
    return cpu / count * 1e6, count / wall


async def run_bus_alone(url: str, count: int) -> tuple[float, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--bus-alone-child", url, str(count), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bus-alone child exited {proc.returncode}")
    us, rate = out.split()
    return float(us), float(rate)


async def one_run(backend: str, store_kind: str, count: int, size: int, spy: Path | None,
                  with_bus_alone: bool = True, parallel_writes: int | None = None) -> dict[str, float]:
    messages = make_messages(count, size)
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="squadbus-persist-")))
        url, broker_pid = stack.enter_context(broker(backend, base))
        pg_pid: int | None = None
        if store_kind == "postgres":
            pg = stack.enter_context(running_postgres())
            for db in ("history", "alone"):
                conn = await asyncpg.connect(pg.url)
                try:
                    await conn.execute(f'CREATE DATABASE "{db}"')
                finally:
                    await conn.close()
            store_url, alone_url = pg.url_for("history"), pg.url_for("alone")
            pg_pid = pg.pid()
        else:
            store_url = f"sqlite+aiosqlite:///{base / 'history.db'}"
            alone_url = f"sqlite+aiosqlite:///{base / 'alone.db'}"

        # The store alone, no bus.
        async with open_store(alone_url) as store:
            await store.write(make_messages(STORE_BATCH, size))  # warm-up
            start = time.perf_counter()
            for i in range(0, count, STORE_BATCH):
                await store.write(messages[i:i + STORE_BATCH])
            alone = count / (time.perf_counter() - start)

        async with Bus.from_url(url) as bus:
            start = time.perf_counter()
            for i in range(0, count, 1000):
                await bus.publish_many(messages[i:i + 1000])
            publish = count / (time.perf_counter() - start)
        bus_us, bus_rate = await run_bus_alone(url, count) if with_bus_alone else (float("nan"), float("nan"))

        log = base / "db-writer.log"
        writer_url = store_url if parallel_writes is None else f"{store_url}?parallel_writes={parallel_writes}"
        started = time.perf_counter()
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                SQUADBUS, "worker", "db-writer", "--url", url, "--store", writer_url,
                stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "SQUADBUS_DATA_DIR": str(base)})
        sampler = None
        if spy is not None:
            sampler = await asyncio.create_subprocess_exec(
                os.environ.get("PY_SPY", "py-spy"), "record", "--pid", str(proc.pid), "--format", "raw",
                "--rate", "200", "--output", str(spy), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
        counter = RowCounter(store_url)
        try:
            first_at = first_rows = None
            cpu_at_first = broker_at_first = pg_at_first = 0.0
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"db-writer exited {proc.returncode}: {log.read_text()[-2000:]}")
                rows = await counter.rows()
                now = time.perf_counter()
                if first_at is None and rows > 0:
                    first_at, first_rows, cpu_at_first = now, rows, cpu_seconds(proc.pid)
                    broker_at_first = cpu_seconds(broker_pid)
                    pg_at_first = 0.0 if pg_pid is None else tree_cpu_seconds(pg_pid)
                if rows >= count:
                    break
                await asyncio.sleep(0.02)
            cpu = cpu_seconds(proc.pid) - cpu_at_first
            broker_cpu = cpu_seconds(broker_pid) - broker_at_first
            pg_cpu = 0.0 if pg_pid is None else tree_cpu_seconds(pg_pid) - pg_at_first
        finally:
            await counter.close()
            if sampler is not None:
                sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                await sampler.wait()
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        assert first_at is not None and first_rows is not None
        steady = count - first_rows
        seconds = now - first_at
        await check_stored(store_url, messages)
        return {
            "db_writer_rows_per_s": steady / seconds if seconds > 0 else float("nan"),
            "store_alone_rows_per_s": alone,
            "bus_alone_msgs_per_s": bus_rate,
            "bus_alone_cpu_us_per_msg": bus_us,
            "publish_many_msgs_per_s": publish,
            "start_to_first_row_s": first_at - started,
            "db_writer_cpu_us_per_row": cpu / steady * 1e6 if steady else float("nan"),
            "broker_cpu_us_per_row": broker_cpu / steady * 1e6 if steady else float("nan"),
            **({"postgres_cpu_us_per_row": pg_cpu / steady * 1e6 if steady else float("nan")}
               if pg_pid is not None else {}),
            "load_average_1min": os.getloadavg()[0],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("redis", "nats"), default="redis")
    parser.add_argument("--store", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="content bytes per message")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="FILE",
                        help="sample the db-writer with py-spy into FILE.<run> (collapsed stacks)")
    parser.add_argument("--no-bus-alone", action="store_true", help="skip the bus-alone measurement")
    parser.add_argument("--parallel-writes", type=int, default=None, metavar="N",
                        help="PostgreSQL: the db-writer's parallel_writes (default: the store's, 1)")
    parser.add_argument("--bus-alone-child", nargs=2, metavar=("URL", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bus_alone_child:
        us, rate = asyncio.run(bus_alone(args.bus_alone_child[0], int(args.bus_alone_child[1])))
        sys.stdout.write(f"{us} {rate}\n")
        return 0
    if args.parallel_writes is not None and args.store != "postgres":
        parser.error("--parallel-writes is a PostgreSQL store setting")
    out = sys.stdout
    runs = []
    for i in range(args.runs):
        spy = None if args.py_spy is None else args.py_spy.with_name(f"{args.py_spy.name}.{i}")
        run = asyncio.run(one_run(args.backend, args.store, args.count, args.size, spy, not args.no_bus_alone,
                                  args.parallel_writes))
        out.write(f"run {i + 1}: {run['db_writer_rows_per_s']:,.0f} rows/s, store alone "
                  f"{run['store_alone_rows_per_s']:,.0f}, db-writer {run['db_writer_cpu_us_per_row']:.1f} us/row, "
                  f"load {run['load_average_1min']:.2f}\n")
        out.flush()
        runs.append(run)
    writes = "" if args.parallel_writes is None else f", parallel_writes={args.parallel_writes}"
    out.write(f"{args.backend} -> db-writer process -> {args.store}{writes}, {args.count:,} msgs of {args.size} B, "
              f"{args.runs} runs (worst .. best, median)\n")
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        median = statistics.median(values)
        out.write(f"  {key:28s} {values[0]:>10,.1f} .. {values[-1]:>10,.1f}  (median {median:,.1f})\n")
    out.write(f"  environment: {Environment.current().as_dict()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
