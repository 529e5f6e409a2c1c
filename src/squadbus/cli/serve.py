"""``squadbus serve``: the HTTP service plus the db-writer, sse-broadcaster, analytics and audit-logger workers.

With no configuration it runs in one process with no servers at all
(``memory://`` bus, SQLite file store) and no tokens, which is allowed only
on a loopback address; the same command runs against PostgreSQL and any
durable backend by changing URLs.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import click

from squadbus.core.errors import SquadbusError
from squadbus.core.settings import Settings

GC_THRESHOLD = 20_000


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def parse_workers(value: str) -> tuple[str, ...]:
    """``all``, ``none`` or a comma-separated list of worker names."""
    from squadbus.service.state import ALL_WORKERS

    if value == "all":
        return ALL_WORKERS
    if value == "none":
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_WORKERS]
    if unknown:
        raise click.BadParameter(f"unknown worker(s) {', '.join(unknown)}; expected {', '.join(ALL_WORKERS)}",
                                 param_hint="--workers")
    return names


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--url", "backend_url", default=None, help="Backend URL (overrides the group's --url / SQUADBUS_URL).")
@click.option("--store", "store_url", default=None, help="History store URL (default: SQUADBUS_STORE_URL or SQLite).")
@click.option("--tokens-file", default=None, type=click.Path(dir_okay=False),
              help="Bearer tokens file (JSON; default SQUADBUS_TOKENS_FILE). Without one the service is open.")
@click.option("--workers", "workers", default="all", show_default=True,
              help="Workers to run in-process: all, none, or a comma list of "
                   "db-writer,sse-broadcaster,analytics,audit-logger.")
@click.option("--audit-path", default=None,
              help="Audit log file (default: audit.jsonl in the data directory, SQUADBUS_DATA_DIR).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
@click.option("--max-connections", default=None, type=click.IntRange(1),
              help="Open connections before new ones get 503 [default: 4096, less under a low open-files limit].")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a connection may take to send a request's headers (408 after).")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request body may take to arrive (408 after).")
@click.pass_context
def serve(
    ctx: click.Context, host: str, port: int, backend_url: str | None, store_url: str | None,
    tokens_file: str | None, workers: str, audit_path: str | None, log_level: str,
    max_connections: int | None, header_timeout: float, body_timeout: float,
) -> None:
    """Run the HTTP service (REST, SSE, /metrics, dashboard) with its workers."""
    import uvicorn

    from squadbus.service import ServiceOptions, create_app
    from squadbus.service.auth import load_tokens
    from squadbus.service.open_mode import is_loopback
    from squadbus.service.server import ServerLimits, ServiceServer, protocol_class

    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()
    try:
        settings = replace(
            base,
            url=backend_url or base.url,
            store_url=store_url or base.store_url,
            tokens_file=tokens_file or base.tokens_file,
        )
        tokens = load_tokens(settings.tokens_file)
        options = ServiceOptions(workers=parse_workers(workers), audit_path=audit_path, body_timeout=body_timeout)
        limits = ServerLimits(header_timeout=header_timeout) if max_connections is None else \
            ServerLimits(max_connections=max_connections, header_timeout=header_timeout)
        # the app refuses non-loopback peers in open mode itself; refusing here fails at start, not per request
        if tokens.open and not is_loopback(host):
            raise click.UsageError(
                f"refusing to serve without tokens on {host}: bind 127.0.0.1 or give --tokens-file "
                "(SQUADBUS_TOKENS_FILE)"
            )
        app = create_app(settings, options=options, tokens=tokens)
    except (SquadbusError, ValueError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(2) from None
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"squadbus serve: listening on http://{shown}:{port} (dashboard /, API /docs, metrics /metrics)")
    click.echo(f"  backend: {redact(settings.url)}")
    click.echo(f"  store:   {redact(settings.store_url)}")
    if "audit-logger" in options.workers:
        click.echo(f"  audit:   {options.audit_path or settings.audit_path}")
    click.echo(f"  workers: {', '.join(options.workers) or 'none'}")
    click.echo(f"  limits:  {limits.max_connections} connections, headers within {limits.header_timeout:g} s, "
               f"bodies within {options.body_timeout:g} s")
    if tokens.open:
        click.echo(f"  auth:    OPEN, no tokens file: anyone who can reach {host} may send and read "
                   "(allowed on loopback only)")
    else:
        click.echo(f"  auth:    bearer tokens from {settings.tokens_file} ({len(tokens.entries)} tokens)")
    # Fewer young-generation collections: with thousands of SSE streams alive, the default threshold
    # (700) makes the collector a large share of the CPU; measured ~20% less CPU and a lower p99.
    gc.set_threshold(GC_THRESHOLD, 50, 1000)
    gc.freeze()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=10, http=protocol_class(limits))
    server = ServiceServer(config)  # ends SSE streams as it stops (no 10 s wait for open dashboards)
    try:
        server.run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    if not server.started:
        logging.getLogger("squadbus.cli").error("the service did not start")
        raise SystemExit(1)
