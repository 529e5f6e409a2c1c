"""Dead letters for records that are not squadbus envelopes (garbage bytes, tombstones).

A handler never sees such a record: the consumer publishes this message to
``agent.dlq.<group>`` itself, then commits past the record, so one bad
record neither blocks its partition nor disappears silently.
"""

from __future__ import annotations

import base64

from squadbus.backends.kafka._driver import ConsumerRecord
from squadbus.core import envelope, subjects
from squadbus.core.dispatch import DLQ_ATTEMPTS, DLQ_GROUP, DLQ_ORIGINAL_ID, DLQ_REASON, DLQ_SUBJECT
from squadbus.core.envelope import Message

SENDER = "squadbus-kafka"
MESSAGE_TYPE = "malformed"
_MAX_TEXT = 64 * 1024
_MAX_RAW = 256 * 1024


def malformed_dead_letter(
    record: ConsumerRecord, *, group: str | None, attempt: int, reason: str, subject: str | None, record_id: str | None
) -> Message:
    """The DLQ message for ``record`` that failed to decode with ``reason``.

    ``content`` is the value as text (invalid UTF-8 replaced, cut at 64 KiB);
    ``metadata["kafka"]`` has the topic, partition, offset, timestamp and key,
    and the raw value in base64 when it is at most 256 KiB.
    """
    raw = bytes(record.value) if record.value is not None else b""
    key = bytes(record.key) if record.key is not None else None
    location: dict[str, object] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "value_bytes": len(raw),
        "tombstone": record.value is None,
    }
    if len(raw) <= _MAX_RAW:
        location["value_base64"] = base64.b64encode(raw).decode()
    name = group or "ephemeral"
    return envelope.build(
        subject=subjects.dead_letter(name),
        sender_id=SENDER,
        content=raw[:_MAX_TEXT].decode("utf-8", "replace"),
        message_type=MESSAGE_TYPE,
        metadata={"kafka": location},
        headers={
            DLQ_REASON: f"malformed record: {reason}"[:1000],
            DLQ_GROUP: name,
            DLQ_ATTEMPTS: str(attempt),
            DLQ_SUBJECT: subject or "",
            DLQ_ORIGINAL_ID: record_id or "",
        },
    )
