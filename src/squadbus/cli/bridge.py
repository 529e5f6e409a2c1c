"""``squadbus bridge``: copy messages from one backend to another until stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import asyncio
import signal

import click

from squadbus.core import subjects
from squadbus.core.backend import StartFrom
from squadbus.core.bus import Bus
from squadbus.core.errors import SquadbusError
from squadbus.workers.bridge import Bridge


async def run_bridge(
    source_url: str, destination_url: str, pattern: str, group: str, from_start: bool, ack_wait: float = 30.0,
    retry_max: float = 5.0,
) -> int:
    """Run a Bridge until SIGINT/SIGTERM (also while it waits for the destination); returns how many
    messages it copied."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Bus.from_url(source_url) as source, Bus.from_url(destination_url) as destination:
        bridge = Bridge(source, destination, pattern=pattern, group=group,
                        start_from=StartFrom.EARLIEST if from_start else StartFrom.NEW, ack_wait=ack_wait,
                        retry_max=retry_max)
        await bridge.start()
        click.echo(f"bridging {pattern} from {source.backend.name} to {destination.backend.name} "
                   f"as group {group!r}; Ctrl-C to stop", err=True)
        await stop.wait()
        await bridge.stop()
        click.echo(f"copied {bridge.copied}, skipped {bridge.skipped}, retried {bridge.retries} "
                   f"(destination outages: {bridge.outages})", err=True)
        return bridge.copied


@click.command()
@click.option("--from", "source_url", required=True, help="Source backend URL.")
@click.option("--to", "destination_url", required=True, help="Destination backend URL.")
@click.option("--pattern", default=subjects.ALL, show_default=True, help="Subjects to copy.")
@click.option("--group", default="bridge", show_default=True, help="Durable consumer group on the source.")
@click.option("--from-start", is_flag=True,
              help="A new group starts from the earliest retained message (without it: from now on).")
@click.option("--ack-wait", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a copy may take before the source redelivers it to another consumer.")
@click.option("--retry-max", default=5.0, show_default=True, type=click.FloatRange(min=0.05),
              help="Longest pause between attempts to store a copy the destination refused.")
def bridge(
    source_url: str, destination_url: str, pattern: str, group: str, from_start: bool, ack_wait: float,
    retry_max: float,
) -> None:
    """Copy messages from one backend to another (a migration without touching producers).

    One bridge per group: on start it takes over what its group holds unacknowledged (a bridge
    that died) before anything new, so executions keep their order in the destination. A copy the
    destination does not store (down, timing out) is retried in place, with backoff up to
    --retry-max seconds, until it is stored; nothing after it is copied meanwhile.
    """
    try:
        asyncio.run(run_bridge(source_url, destination_url, pattern, group, from_start, ack_wait, retry_max))
    except (SquadbusError, OSError, ImportError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(1) from None
