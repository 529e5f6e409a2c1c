"""Engine-neutral pieces of the stores: cursors, seq assignment, row decoding, timestamps, id claims."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from squadbus.core import envelope
from squadbus.core.envelope import Message
from squadbus.core.errors import InvalidMessage
from squadbus.store.base import IdClaim, InvalidQuery, StoredMessage

logger = logging.getLogger("squadbus.store")

Body = bytes | bytearray | memoryview

NO_EXECUTION = ""
"""Counter key of the one sequence shared by messages without a task_execution_id."""

_CURSOR_PREFIX = "v1:"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def exec_key(message: Message) -> str:
    """The key of the sequence ``message`` belongs to."""
    execution = message.task_execution_id
    return NO_EXECUTION if execution is None else str(execution)


def exec_keys(messages: Sequence[Message]) -> list[str]:
    """:func:`exec_key` of each message, one ``str(UUID)`` per execution: a batch holds few executions,
    and a str(UUID) per message was 3 % of the db-writer's CPU (py-spy, NATS -> PostgreSQL)."""
    memo: dict[UUID | None, str] = {}
    keys: list[str] = []
    for message in messages:
        execution = message.task_execution_id
        key = memo.get(execution)
        if key is None:
            key = memo[execution] = exec_key(message)
        keys.append(key)
    return keys


def encode_cursor(position: int) -> str:
    """An opaque cursor for "after stored position ``position``"."""
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{position}".encode()).decode().rstrip("=")


def position_cursor(position: int) -> str:
    """The history cursor (``HistoryQuery.cursor``) meaning "after stored position ``position``".

    ``StoredMessage.position`` of a row read back is such a position; 0 means from the start.
    """
    return encode_cursor(position)


def decode_cursor(cursor: str) -> int:
    """The stored position inside ``cursor``; raises InvalidQuery when it is not ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith(_CURSOR_PREFIX):
            position = int(text[len(_CURSOR_PREFIX):])
            if 0 <= position < 2**63:  # positions are int64 in every engine: a larger one cannot be a query value
                return position
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidQuery(f"invalid cursor {cursor[:40]!r}: pass next_cursor from a previous page unchanged")


def fitting(sizes: Sequence[int], max_bytes: int) -> int:
    """How many leading rows of ``sizes`` (body bytes) fit in ``max_bytes``; at least one if any."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > max_bytes and count > 0:
            return count
    return len(sizes)


def unique_by_id(messages: Sequence[Message]) -> list[Message]:
    """``messages`` without repeated ids (first occurrence wins), in order."""
    seen: dict[UUID, Message] = {}
    for message in messages:
        seen.setdefault(message.id, message)
    return list(seen.values())


def assign_seqs(new: Sequence[Message], last_seqs: dict[str, int]) -> list[int]:
    """Seqs for ``new`` in input order per execution; updates ``last_seqs`` in place."""
    seqs: list[int] = []
    for message in new:
        key = exec_key(message)
        seq = last_seqs.get(key, 0) + 1
        last_seqs[key] = seq
        seqs.append(seq)
    return seqs


def encode_body(message: Message) -> bytes:
    """The stored form of ``message``: its wire bytes, so reads return it exactly."""
    try:
        return envelope.encode(message)
    except (TypeError, ValueError) as exc:  # e.g. a lone surrogate in content
        raise InvalidMessage(f"message {message.id} cannot be encoded: {exc}") from exc


def index_text(value: str) -> str:
    """``value`` as stored in an indexed text column (PostgreSQL text cannot hold NUL)."""
    return value.replace("\x00", "") if "\x00" in value else value


def decode_row(
    seq: int, stored_at: datetime, body: Body, where: object, position: int | None = None
) -> StoredMessage | None:
    """A StoredMessage from a row, or None (logged) when the stored body is not a valid envelope."""
    try:
        message = envelope.decode(bytes(body), max_content_bytes=1 << 62)
    except InvalidMessage as exc:
        logger.warning("skipping malformed history row %s (seq %s): %s", where, seq, exc)
        return None
    return StoredMessage(seq=seq, stored_at=stored_at, message=message, position=position)


def to_micros(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (SQLite columns)."""
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    """The aware UTC datetime of ``micros`` since the epoch."""
    return _EPOCH + timedelta(microseconds=micros)


def sorted_agents(values: Iterable[str | None]) -> list[str]:
    """Distinct non-null ids, sorted."""
    return sorted({v for v in values if v is not None})


def existing_row(seq: int, stored_at: datetime, body: Body, offered: Message) -> StoredMessage:
    """The stored row a duplicate write returns; ``offered`` stands in if the stored body is unreadable."""
    row = decode_row(seq, stored_at, body, offered.id)
    return row if row is not None else StoredMessage(seq=seq, stored_at=stored_at, message=offered)


def first_claims(claims: Sequence[IdClaim]) -> dict[UUID, IdClaim]:
    """The first claim of each id in ``claims``, in order."""
    wanted: dict[UUID, IdClaim] = {}
    for item in claims:
        wanted.setdefault(item.id, item)
    return wanted


def claim_holder(wanted: IdClaim, held: IdClaim | None) -> IdClaim:
    """The claim holding ``wanted.id``: ``wanted`` itself unless a claim of another fingerprint holds it."""
    return wanted if held is None or held.fingerprint == wanted.fingerprint else held


def decide_claim_groups(
    groups: Sequence[Sequence[IdClaim]], held: dict[UUID, IdClaim]
) -> tuple[list[list[IdClaim]], dict[UUID, IdClaim]]:
    """Decide ``groups`` one after another against the claims ``held`` before them (see ``ClaimsIdGroups``).

    Returns each group's result (the holder of each of its claims, in order)
    and the claims to record, by id: those of the groups that hold, on ids
    nobody held before them.
    """
    holders = dict(held)
    recorded: dict[UUID, IdClaim] = {}
    results: list[list[IdClaim]] = []
    for group in groups:
        wanted = first_claims(group)
        outcome = {i: claim_holder(w, holders.get(i)) for i, w in wanted.items()}
        if all(outcome[i].fingerprint == w.fingerprint for i, w in wanted.items()):
            for i, w in wanted.items():
                if i not in holders:
                    holders[i] = recorded[i] = w
        results.append([outcome[item.id] for item in group])
    return results, recorded
