"""Engine-neutral pieces of the execution and agent lists: cursors and the summaries built from rows."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from squadbus.core import envelope
from squadbus.core.errors import InvalidMessage
from squadbus.store import _common as c
from squadbus.store.base import LISTED, ExecutionSummary, InvalidQuery

_EXEC_PREFIX = "e1:"
_AGENT_PREFIX = "a1:"
DOMAIN_BODY_BYTES = 64 * 1024
"""Bodies larger than this are not read to find an agent's domain."""


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(cursor: str, prefix: str) -> str | None:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return text[len(prefix):] if text.startswith(prefix) else None


def _bad(cursor: str) -> InvalidQuery:
    return InvalidQuery(f"invalid cursor {cursor[:40]!r}: pass next_cursor from a previous page of the same list "
                        "unchanged")


def encode_execution_cursor(last_at_us: int, execution: UUID) -> str:
    """The cursor meaning "after the execution last active at ``last_at_us`` with this id", newest first."""
    return _b64(f"{_EXEC_PREFIX}{last_at_us}:{execution.hex}")


def decode_execution_cursor(cursor: str) -> tuple[int, str]:
    """``(last activity in microseconds, exec_key)`` of an execution cursor; raises InvalidQuery."""
    text = _unb64(cursor, _EXEC_PREFIX)
    if text is not None:
        micros, _, hex_id = text.partition(":")
        try:
            value, execution = int(micros), UUID(hex=hex_id)
        except ValueError:
            raise _bad(cursor) from None
        if 0 <= value < 2**63 and len(hex_id) == 32:
            return value, str(execution)
    raise _bad(cursor)


def encode_agent_cursor(agent_id: str) -> str:
    """The cursor meaning "after agent ``agent_id``"."""
    return _b64(_AGENT_PREFIX + agent_id)


def decode_agent_cursor(cursor: str) -> str:
    """The agent id inside an agent cursor; raises InvalidQuery."""
    text = _unb64(cursor, _AGENT_PREFIX)
    if not text:
        raise _bad(cursor)
    return text


def id_prefix_filter(prefix: str | None) -> tuple[str | None, str | None]:
    """``(exact exec_key, prefix)``: a whole UUID matches exactly, anything shorter as a prefix."""
    if prefix is None or prefix == "":
        return None, None
    if len(prefix) == 36:
        try:
            return str(UUID(prefix)), None
        except ValueError:
            pass
    return None, prefix


@dataclass
class ExecutionRows:
    """What the per-execution rows of a page add up to (grouped by sender, recipient and type)."""

    count: int = 0
    first_at: datetime | None = None
    agents: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)

    def add(self, sender: str, recipient: str | None, message_type: str, count: int, first_at: datetime) -> None:
        """Fold in one group of rows."""
        self.count += count
        self.first_at = first_at if self.first_at is None else min(self.first_at, first_at)
        self.agents.add(sender)
        if recipient is not None:
            self.agents.add(recipient)
        self.types.add(message_type)


def summaries(
    page: Iterable[tuple[UUID, datetime]], groups: Iterable[tuple[UUID, str, str | None, str, int, datetime]]
) -> list[ExecutionSummary]:
    """The summaries of ``page`` ((id, last activity) in order) from its grouped rows.

    An execution without rows (deleted outside retention) is left out.
    """
    folded: dict[UUID, ExecutionRows] = {}
    for execution, sender, recipient, message_type, count, first_at in groups:
        folded.setdefault(execution, ExecutionRows()).add(sender, recipient, message_type, count, first_at)
    out: list[ExecutionSummary] = []
    for execution, last_at in page:
        rows = folded.get(execution)
        if rows is None or rows.first_at is None:
            continue
        agents, types = sorted(rows.agents), sorted(rows.types)
        out.append(ExecutionSummary(
            task_execution_id=execution, message_count=rows.count, first_activity_at=rows.first_at,
            last_activity_at=last_at, agents=agents[:LISTED], agent_count=len(agents),
            message_types=types[:LISTED], message_type_count=len(types),
        ))
    return out


def domain_of(bodies: Iterable[c.Body | None]) -> str | None:
    """The ``domain`` of the first readable body that names one (bodies newest first; None = not read)."""
    for body in bodies:
        if body is None:
            continue
        try:
            domain = envelope.decode(bytes(body), max_content_bytes=1 << 62).domain
        except InvalidMessage:
            continue
        if domain is not None:
            return domain
    return None


def prefix_upper(prefix: str) -> str | None:
    """The smallest string after every string starting with ``prefix`` in code-point order (None: no bound)."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF or 0xD7FF <= last < 0xE000:
        return None
    return prefix[:-1] + chr(last + 1)
