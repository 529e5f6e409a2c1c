"""``squadbus worker NAME``: run one worker alone until SIGTERM/SIGINT, then stop it gracefully.

On the signal the worker stops taking deliveries, finishes and acks what is in
flight, and the process exits 0. A second signal is not needed and not special.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import signal
from dataclasses import replace

import click

from squadbus.core.bus import Bus
from squadbus.core.settings import Settings
from squadbus.store.base import HistoryStore, open_store
from squadbus.workers.base import Worker
from squadbus.workers.registry import build_worker, worker_names


async def run_worker(
    name: str, settings: Settings, *, audit_path: str | None = None, report_every: float = 0.0,
    stop: asyncio.Event | None = None,
) -> None:
    """Run worker ``name`` until ``stop`` is set (or SIGTERM/SIGINT arrives), then stop it gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    store: HistoryStore = open_store(settings.store_url)
    needs_store = name == "db-writer"
    try:
        async with Bus.from_settings(settings) as bus:
            if needs_store:
                await store.open()
            worker: Worker
            if name == "audit-logger" and audit_path:
                from squadbus.workers.audit import AuditLogger

                worker = AuditLogger(bus, path=audit_path)
            else:
                worker = build_worker(name, bus, store, settings)
            await worker.start()
            # What exists once the worker runs lives as long as it does: out of every later collection
            # (a full collection otherwise walks it all again; issue 15, docs/scaling.md).
            gc.collect()
            gc.freeze()
            click.echo(f"squadbus worker {name}: running on {bus.backend.name}"
                       + (f", store {type(store).__name__}" if needs_store else ""))
            try:
                while not stop.is_set():
                    timeout = report_every if report_every > 0 else None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout)
                    if report_every > 0 and not stop.is_set():
                        click.echo(json.dumps(summary(worker)))
            finally:
                gc.unfreeze()  # the caller goes on (a test, an embedding process): collectable again
                await worker.stop()
                click.echo(f"squadbus worker {name}: stopped; {json.dumps(summary(worker))}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if needs_store:
            await store.close()


def summary(worker: Worker) -> dict[str, object]:
    """A small JSON-able summary of what ``worker`` did."""
    out: dict[str, object] = {"worker": worker.name}
    figures = getattr(worker, "figures", None)
    if figures is not None:
        out.update(messages=figures.messages, by_type=dict(figures.by_type), agents=len(figures.agents),
                   responses_timed=figures.response_time.count)
    for attr in ("written", "seen"):
        if hasattr(worker, attr):
            out[attr] = getattr(worker, attr)
    stats = getattr(worker, "stats", None)
    if stats is not None and hasattr(stats, "messages"):
        out["messages"] = stats.messages
    return out


@click.command()
@click.argument("name", type=click.Choice(worker_names()))
@click.option("--url", "backend_url", default=None, help="Backend URL (overrides the group's --url / SQUADBUS_URL).")
@click.option("--store", "store_url", default=None, help="History store URL (db-writer).")
@click.option("--audit-path", default=None,
              help="Audit log file (audit-logger; default: audit.jsonl in the data directory).")
@click.option("--report-every", default=0.0, type=float, help="Print a JSON summary every N seconds (0 = never).")
@click.pass_context
def worker(ctx: click.Context, name: str, backend_url: str | None, store_url: str | None,
           audit_path: str | None, report_every: float) -> None:
    """Run worker NAME alone (db-writer, analytics, audit-logger, sse-broadcaster) until SIGTERM."""
    from squadbus.cli.errors import run

    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
    settings = replace(base, url=backend_url or base.url, store_url=store_url or base.store_url)
    run(run_worker(name, settings, audit_path=audit_path, report_every=report_every))
