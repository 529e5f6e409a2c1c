"""``squadbus bench``: squadbus beside the raw client, same work, same run, against a server you name."""

from __future__ import annotations

import asyncio
import importlib
import sys

import click

from squadbus.benchmarks.stats import Environment, format_table, to_json
from squadbus.core.errors import SquadbusError
from squadbus.core.registry import scheme_of

# URL scheme -> benchmark module with ``async def run(*, url, count, rate) -> list[Result]``.
BENCHMARKS = {
    "memory": "squadbus.benchmarks.memory",
    "redis": "squadbus.benchmarks.redis",
    "rediss": "squadbus.benchmarks.redis",
    "nats": "squadbus.benchmarks.nats",
    "kafka": "squadbus.benchmarks.kafka",
}


@click.command()
@click.option("--count", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="Messages per throughput run.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=1_000.0, show_default=True,
              help="Open-loop rate (msgs/s).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--url", "backend_url", default=None, help="Backend URL (overrides the group's --url / SQUADBUS_URL).")
@click.pass_context
def bench(ctx: click.Context, count: int, rate: float, as_json: bool, backend_url: str | None) -> None:
    """Benchmark the backend named by --url (a running server) beside its raw client."""
    url = backend_url or ctx.obj.url
    try:
        module = importlib.import_module(BENCHMARKS[scheme_of(url)])
    except KeyError:
        click.echo(f"squadbus: error: no benchmark for {url!r}", err=True)
        raise SystemExit(1) from None
    try:
        results = asyncio.run(module.run(url=url, count=count, rate=rate))
    except (SquadbusError, OSError, ValueError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(1) from None
    if as_json:
        click.echo(to_json(results, url=url, environment=Environment.current().as_dict()))
    else:
        sys.stdout.write(format_table(results) + "\n")
