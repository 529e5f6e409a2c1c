"""How the CLI fails: one line on stderr (``squadbus: error: ...``) and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import IO, Any, TypeVar

import click

from squadbus.core.errors import SquadbusError

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(click.ClickException):
    """A failure shown as ``squadbus: error: <message>`` with exit status 1."""

    exit_code = EXIT_ERROR

    def show(self, file: IO[Any] | None = None) -> None:
        """Print the one line on stderr."""
        click.echo(f"squadbus: error: {self.format_message()}", err=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; squadbus and OS errors become one line on stderr and exit status 1."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (SquadbusError, OSError, ImportError) as exc:
        click.echo(f"squadbus: error: {exc}", err=True)
        raise SystemExit(EXIT_ERROR) from None
