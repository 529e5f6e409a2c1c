"""The ``squadbus`` command: one clear line and a non-zero exit on error, never a traceback."""

from __future__ import annotations

import logging
from dataclasses import replace

import click

from squadbus import __version__
from squadbus.cli.a2a import a2a
from squadbus.cli.api import DEFAULT_LOCAL_API
from squadbus.cli.bench import bench
from squadbus.cli.bridge import bridge
from squadbus.cli.demo import demo
from squadbus.cli.errors import EXIT_ERROR, EXIT_USAGE, run
from squadbus.cli.history import history
from squadbus.cli.plan import plan
from squadbus.cli.retention import retention
from squadbus.cli.send import send
from squadbus.cli.serve import serve
from squadbus.cli.simulate import simulate
from squadbus.cli.tail import tail
from squadbus.cli.target import LOCAL_API_KEY
from squadbus.cli.verify import verify
from squadbus.cli.worker import worker
from squadbus.core.errors import SquadbusError
from squadbus.core.settings import Settings

__all__ = ["EXIT_ERROR", "EXIT_USAGE", "main", "run", "settings_from"]


def settings_from(ctx: click.Context) -> Settings:
    """The Settings object built by the ``main`` group (env + --url + --api)."""
    settings: Settings = ctx.obj
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--url", envvar=None, default=None, help="Backend URL (default: SQUADBUS_URL, MESSAGE_BUS or memory://).")
@click.option("--api", "api_url", default=None, metavar="URL",
              help="A running service's HTTP API that send, tail, history and demo go through (default: "
                   f"SQUADBUS_API; token SQUADBUS_TOKEN). On memory:// a service at {DEFAULT_LOCAL_API} is "
                   "used when one answers.")
@click.option("--local-api", default=DEFAULT_LOCAL_API, hidden=True,
              help="Where to look for a local service on memory:// (a serve on another port; tests).")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def main(ctx: click.Context, url: str | None, api_url: str | None, local_api: str, verbose: int) -> None:
    """squadbus: messaging for a squad of AI agents (not the AWS agent-squad project)."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings.from_env()
        settings = settings.with_url(url) if url else settings
        ctx.obj = replace(settings, api_url=api_url) if api_url else settings
    except SquadbusError as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    ctx.meta[LOCAL_API_KEY] = local_api


@main.command()
def version() -> None:
    """Print the squadbus version."""
    click.echo(f"squadbus {__version__}")


main.add_command(send)
main.add_command(tail)
main.add_command(demo)
main.add_command(bench)
main.add_command(bridge)
main.add_command(history)
main.add_command(retention)
main.add_command(serve)
main.add_command(worker)
main.add_command(verify)
main.add_command(simulate)
main.add_command(plan)
main.add_command(a2a)
