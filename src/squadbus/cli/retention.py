"""``squadbus retention``: delete history older than N days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from squadbus.cli.errors import CliError, run
from squadbus.cli.history import sqlite_path, store_url_of
from squadbus.core.errors import SquadbusError
from squadbus.store import open_store


@click.command()
@click.option("--older-than-days", "days", type=click.FloatRange(min=0), required=True,
              help="Delete messages stored more than this many days ago.")
@click.option("--store", "store_url", default=None,
              help="Store URL (default: SQUADBUS_STORE_URL or squadbus.db in the data directory).")
@click.pass_context
def retention(ctx: click.Context, days: float, store_url: str | None) -> None:
    """Delete stored messages older than --older-than-days.

    Sequence numbers are never reused: SSE viewers resuming from a deleted
    position get an explicit gap event.
    """
    url = store_url_of(ctx, store_url)
    cutoff = datetime.now(UTC) - timedelta(days=days)
    try:
        path = sqlite_path(url)
    except SquadbusError as exc:
        raise CliError(str(exc)) from None
    if path is not None and not Path(path).exists():  # nothing to delete; never create a store to find out
        click.echo(f"deleted 0 messages: no history at {Path(path).absolute()}")
        return

    async def go() -> int:
        async with open_store(url) as store:
            return await store.delete_older_than(cutoff)

    deleted = run(go())
    click.echo(f"deleted {deleted} messages stored before {cutoff.isoformat(timespec='seconds')}")
