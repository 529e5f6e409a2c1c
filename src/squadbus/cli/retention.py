"""``squadbus retention``: delete history older than N days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from squadbus.cli.errors import run
from squadbus.cli.history import store_url_of
from squadbus.store import open_store


@click.command()
@click.option("--older-than-days", "days", type=click.FloatRange(min=0), required=True,
              help="Delete messages stored more than this many days ago.")
@click.option("--store", "store_url", default=None, help="Store URL (default: SQUADBUS_STORE_URL or ./squadbus.db).")
@click.pass_context
def retention(ctx: click.Context, days: float, store_url: str | None) -> None:
    """Delete stored messages older than --older-than-days.

    Sequence numbers are never reused: SSE viewers resuming from a deleted
    position get an explicit gap event.
    """
    url = store_url_of(ctx, store_url)
    cutoff = datetime.now(UTC) - timedelta(days=days)

    async def go() -> int:
        async with open_store(url) as store:
            return await store.delete_older_than(cutoff)

    deleted = run(go())
    click.echo(f"deleted {deleted} messages stored before {cutoff.isoformat(timespec='seconds')}")
