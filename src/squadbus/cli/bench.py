"""``squadbus bench``: squadbus beside the raw client of the same backend, same load, same run.

The load generator is :mod:`squadbus.benchmarks.loadgen`; each backend's raw
client is in ``squadbus.benchmarks.<backend>`` (its ``TARGET``). ``--suite``
runs the older fixed suite of that module instead (``run(url, count, rate)``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click

from squadbus import __version__
from squadbus.benchmarks import loadgen
from squadbus.benchmarks.resources import Process, broker_process
from squadbus.benchmarks.stats import Environment, format_table, to_json
from squadbus.core.errors import SquadbusError
from squadbus.core.registry import scheme_of

# URL scheme -> benchmark module (``TARGET`` for the load generator, ``run`` for --suite).
BENCHMARKS = {
    "memory": "squadbus.benchmarks.memory",
    "redis": "squadbus.benchmarks.redis",
    "rediss": "squadbus.benchmarks.redis",
    "nats": "squadbus.benchmarks.nats",
    "tls": "squadbus.benchmarks.nats",
    "kafka": "squadbus.benchmarks.kafka",
    "amqp": "squadbus.benchmarks.rabbitmq",
    "amqps": "squadbus.benchmarks.rabbitmq",
}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|kb|k|mib|mb|m)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024 * 1024, "mib": 1024 * 1024,
          "mb": 1000 * 1000}
MIN_SIZE = 16


def parse_size(text: str) -> int:
    """``1KiB`` -> 1024, ``512`` -> 512, ``1kB`` -> 1000; raises ValueError."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 1KiB, 512, 4kB)")
    return int(match.group(1)) * _UNITS[match.group(2).lower() if match.group(2) else None]


def redacted(url: str) -> str:
    """``url`` without a password (the report is meant to be shared)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _fail(message: str) -> None:
    click.echo(f"squadbus: error: {message}", err=True)
    raise SystemExit(1)


@click.command()
@click.option("--url", "backend_url", default=None, help="Backend URL (overrides the group's --url / SQUADBUS_URL).")
@click.option("--size", default="1KiB", show_default=True, help="Content size of each message (B, KiB, MiB, kB).")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: messages per second, latency from each message's intended send time "
                   "[default: 1000].")
@click.option("--max", "max_mode", is_flag=True, help="Max throughput: every sender sends as fast as acks come back.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="Seconds of load per line (with --rate: rate x duration messages).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Messages per line instead of --duration (with --suite: per throughput run, default 20000).")
@click.option("--senders", type=click.IntRange(min=1), multiple=True, default=(100, 1), show_default=True,
              help="Concurrent senders (agents), each awaiting its send; repeat for several patterns.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rounds of every pattern (raw and squadbus alternate which goes first).")
@click.option("--json", "json_file", is_flag=False, flag_value="-", default=None, metavar="FILE",
              help="Write the figures as JSON to FILE ('-' or no FILE: stdout instead of the table).")
@click.option("--plot", "plot_file", default=None, metavar="FILE.png",
              help="Plot latency percentiles and throughput over time (needs matplotlib: squadbus[bench]).")
@click.option("--progress/--no-progress", default=None,
              help="A progress bar on stderr [default: when stderr is a terminal].")
@click.option("--broker-pid", type=click.IntRange(min=1), default=None, metavar="PID",
              help="The broker's process, for its CPU and memory [default: the process listening on the URL's "
                   "port, when it runs on this machine].")
@click.option("--suite", is_flag=True, help="Run the backend's older fixed suite (--count, --rate) instead.")
@click.pass_context
def bench(ctx: click.Context, backend_url: str | None, size: str, rate: float | None, max_mode: bool,
          duration: float, count: int | None, senders: tuple[int, ...], rounds: int, json_file: str | None,
          plot_file: str | None, progress: bool | None, broker_pid: int | None, suite: bool) -> None:
    """Benchmark the backend named by --url (a running server) beside its raw client, same load, same run.

    Open loop at --rate (default 1000 msgs/s) or --max; --senders concurrent agents each await
    their Bus.send into a group handler, and the raw client does the same. Prints p50, p99,
    p99.9, p99.99 and max of publish->ack and end to end, sender lag, msgs/s, the ratio,
    the broker's version and durability profile, and the CPU and memory of this process and
    of the broker (when it runs on this machine) over every line.
    """
    url = backend_url or ctx.obj.url
    try:
        module = importlib.import_module(BENCHMARKS[scheme_of(url)])
    except KeyError:
        _fail(f"no benchmark for {url!r} (memory://, redis://, nats://, kafka://, amqp://)")
    except SquadbusError as exc:
        _fail(str(exc))
    except ImportError as exc:
        _fail(str(exc))
    if rate is not None and max_mode:
        _fail("--rate and --max exclude each other")
    if suite and not hasattr(module, "run"):
        _fail(f"no --suite for {scheme_of(url)}:// (bench/bench_rabbitmq.py runs RabbitMQ's, on a node of its own)")
    if suite:
        _run_suite(module, url, count or 20_000, rate or 1_000.0, json_file)
        return
    try:
        content_size = parse_size(size)
    except ValueError as exc:
        _fail(str(exc))
    if content_size < MIN_SIZE:
        _fail(f"--size must be at least {MIN_SIZE} bytes")
    if plot_file is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail("--plot needs matplotlib: pip install 'squadbus[bench]'")
    if broker_pid is not None and broker_process(url, broker_pid).pid is None:
        _fail(f"--broker-pid {broker_pid}: no such process")
    offered = None if max_mode else (rate or 1_000.0)
    loads = [loadgen.Load(rate=offered, duration=duration, count=count, size=content_size, senders=n)
             for n in dict.fromkeys(senders)]
    stream = loadgen.progress_stream(progress)
    try:
        broker, process, comparisons = asyncio.run(
            _measure(module, url, loads, rounds, loadgen.Progress(stream), broker_pid))
    except (SquadbusError, loadgen.BenchError) as exc:
        _fail(_describe(exc))
    except Exception as exc:  # a driver's own error (redis-py, nats-py, aiokafka): one line, never a traceback
        _fail(f"{redacted(url)}: {_describe(exc)}")
    document = _document(url, broker, process, loads[0], comparisons)
    if json_file == "-":
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        sys.stdout.write(loadgen.format_report(comparisons, broker, loads[0]) + "\n")
        sys.stdout.write(f"broker process (CPU, memory): {process.line()}\n")
        if json_file is not None:
            Path(json_file).write_text(json.dumps(document, indent=2) + "\n")
    if plot_file is not None:
        from squadbus.benchmarks.plot import plot

        plot(comparisons, broker, Path(plot_file))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, loadgen.BenchError | SquadbusError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _measure(module: ModuleType, url: str, loads: list[loadgen.Load], rounds: int,
                   progress: loadgen.Progress, broker_pid: int | None
                   ) -> tuple[loadgen.Broker, Process, list[loadgen.Comparison]]:
    target: loadgen.Target = module.TARGET
    broker = await target.broker(url)
    process = broker_process(url, broker_pid)
    comparisons = []
    for load in loads:
        for round_ in range(rounds):
            comparisons.append(await loadgen.compare(target, url, load, broker, round_=round_, progress=progress,
                                                     broker_process=process))
    return broker, process, comparisons


def _document(url: str, broker: loadgen.Broker, process: Process, load: loadgen.Load,
              comparisons: list[loadgen.Comparison]) -> dict[str, Any]:
    return {
        "squadbus_version": __version__,
        "url": redacted(url),
        "backend": scheme_of(url),
        "broker": {"name": broker.name, "version": broker.version, "durability": broker.durability},
        "broker_process": process.as_dict(),
        "mode": load.mode,
        "rate": load.rate,
        "duration_s": None if load.count is not None else load.duration,
        "count": load.count,
        "size_bytes": load.size,
        "method": "open loop from the intended send time" if load.rate is not None else
                  "closed loop per sender, as fast as acks come back",
        "environment": Environment.current().as_dict(),
        "runs": [c.as_dict() for c in comparisons],
    }


def _run_suite(module: ModuleType, url: str, count: int, rate: float, json_file: str | None) -> None:
    """The module's fixed suite, as ``squadbus bench`` ran it before the load generator."""
    try:
        results = asyncio.run(module.run(url=url, count=count, rate=rate))
    except Exception as exc:  # a driver's own error: one line, never a traceback
        _fail(_describe(exc))
    if json_file is None:
        sys.stdout.write(format_table(results) + "\n")
        return
    text = to_json(results, url=redacted(url), environment=Environment.current().as_dict())
    if json_file == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(json_file).write_text(text + "\n")
