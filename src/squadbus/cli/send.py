"""``squadbus send``: one message, through a running service or straight onto a shared bus."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from squadbus.cli.errors import CliError, run
from squadbus.cli.target import service_or_bus, settings_of
from squadbus.core import envelope, subjects
from squadbus.core.bus import Bus
from squadbus.core.envelope import Message
from squadbus.core.errors import SquadbusError

STDIN = "-"


def read_content(content: str, allow_empty: bool) -> str:
    """CONTENT, or all of stdin for ``-``; empty content is refused unless ``allow_empty``."""
    text = sys.stdin.read() if content == STDIN else content
    if not text and not allow_empty:
        raise click.BadParameter("empty content (nothing to say?): pass --allow-empty to send it anyway",
                                 param_hint="CONTENT")
    return text


def build(sender: str, recipient: str, content: str, message_type: str, task_execution_id: str | None,
          metadata: dict[str, Any] | None, message_id: str | None, max_content_bytes: int) -> Message:
    """The message to send, validated here so that bad input fails before anything is reached."""
    domain = recipient.removeprefix("domain:") if recipient.startswith("domain:") else None
    to = None if recipient == "*" or domain else recipient
    if to is not None:
        subject = subjects.direct(to)
    else:
        subject = subjects.BROADCAST if domain is None else subjects.domain(domain)
    return envelope.build(
        subject=subject, sender_id=sender, recipient_id=to, content=content, message_type=message_type,
        domain=domain, task_execution_id=task_execution_id, metadata=metadata, id=message_id,
        max_content_bytes=max_content_bytes,
    )


def api_body(message: Message) -> dict[str, Any]:
    """The ``POST /v1/messages`` body of ``message``, with its id (so the service keeps it)."""
    return {
        "id": str(message.id), "sender_id": message.sender_id, "recipient_id": message.recipient_id,
        "domain": message.domain, "content": message.content, "message_type": message.message_type,
        "task_execution_id": None if message.task_execution_id is None else str(message.task_execution_id),
        "metadata": message.metadata,
    }


@click.command()
@click.argument("sender")
@click.argument("recipient")
@click.argument("content")
@click.option("--type", "message_type", default="message", show_default=True, help="message_type of the message.")
@click.option("--execution", "task_execution_id", default=None, help="task_execution_id (UUID).")
@click.option("--metadata", default=None, help="Metadata as a JSON object.")
@click.option("--id", "message_id", default=None, help="Client-set message id (UUID), the idempotency key.")
@click.option("--allow-empty", is_flag=True, help="Send empty content (refused otherwise).")
@click.pass_context
def send(
    ctx: click.Context, sender: str, recipient: str, content: str, message_type: str,
    task_execution_id: str | None, metadata: str | None, message_id: str | None, allow_empty: bool,
) -> None:
    """Send CONTENT from SENDER to RECIPIENT ('*' broadcasts to the squad, 'domain:NAME' to a domain).

    CONTENT '-' reads it from stdin (for large messages). Prints the message id and subject.
    """
    try:
        meta = json.loads(metadata) if metadata else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="--metadata") from None
    text = read_content(content, allow_empty)
    settings = settings_of(ctx)
    try:
        message = build(sender, recipient, text, message_type, task_execution_id, meta, message_id,
                        settings.max_content_bytes)
        client = service_or_bus(ctx, "send")
        if client is not None:
            stored = client.send(api_body(message))
            click.echo(json.dumps({"id": stored["id"], "subject": stored["subject"]}))
            return
    except SquadbusError as exc:
        raise CliError(str(exc)) from None

    async def go() -> None:
        async with Bus.from_settings(settings) as bus:
            await bus.publish(message)
        click.echo(json.dumps({"id": str(message.id), "subject": message.subject}))

    run(go())
