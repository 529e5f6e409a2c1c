"""Which squad a CLI command reaches: a running service's HTTP API, or the bus URL itself.

The rule, in order:

1. ``--api URL`` or ``SQUADBUS_API``: that service (token ``SQUADBUS_TOKEN``);
   if it does not answer, the command fails: it never falls back silently;
2. the bus is ``memory://``: the squad lives inside some process, so the
   command looks for a local service (``squadbus serve``, ``make run``) at
   ``http://127.0.0.1:8000`` (``--local-api`` moves the address) and uses it
   when a squadbus service answers there;
3. otherwise the command uses the bus URL directly (a broker every process
   shares). On ``memory://`` with no service, a command that can only talk to
   its own process refuses, in one line, instead of succeeding into the void.
"""

from __future__ import annotations

import click

from squadbus.cli.api import DEFAULT_LOCAL_API, ApiClient, probe
from squadbus.cli.errors import CliError
from squadbus.core.settings import Settings

LOCAL_API_KEY = "squadbus.local_api"
"""``click.Context.meta`` key of the address where a local service is looked for."""


def settings_of(ctx: click.Context) -> Settings:
    """The Settings built by the ``main`` group (or from the environment when run alone)."""
    return ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()


def is_memory(url: str) -> bool:
    """True for the in-process bus, which no other process can reach."""
    return url.split("://", 1)[0].lower() == "memory"


def local_api(ctx: click.Context) -> str:
    """Where a local service is looked for (the group's ``--local-api``)."""
    return str(ctx.meta.get(LOCAL_API_KEY, DEFAULT_LOCAL_API))


def find_service(ctx: click.Context) -> ApiClient | None:
    """The service this command should talk to, by the rule of the module docstring (None: use the bus)."""
    settings = settings_of(ctx)
    if settings.api_url:
        return ApiClient(settings.api_url, settings.api_token)
    if is_memory(settings.url):
        address = local_api(ctx)
        if probe(address):
            return ApiClient(address, settings.api_token)
    return None


def no_squad(ctx: click.Context, command: str) -> CliError:
    """The one-line refusal of a command that would talk only to its own in-process bus."""
    return CliError(
        f"{command}: the bus is memory://, which lives inside this one process, and no squadbus service "
        f"answers at {local_api(ctx)}, so nothing would reach a squad; start one with `make run` "
        "(squadbus serve) or point at one with --api URL (SQUADBUS_API), or use a broker with --url "
        "redis://..., nats://... or kafka://..."
    )


def service_or_bus(ctx: click.Context, command: str) -> ApiClient | None:
    """The service to talk to; None means the bus URL reaches other processes; raises when nothing does."""
    client = find_service(ctx)
    if client is None and is_memory(settings_of(ctx).url):
        raise no_squad(ctx, command)
    return client
