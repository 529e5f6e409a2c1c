"""Consumer-group figures of the NATS backend (``DescribesGroups``) from JetStream consumer info.

Every durable consumer of the stream is a group (whichever process made it):
``lag`` is its ``num_pending`` (messages matching its filter not delivered
yet), ``pending`` its ``num_ack_pending`` (delivered, not acknowledged),
``redeliveries`` its ``num_redelivered`` (unacknowledged messages delivered
more than once). ``dead_letters`` is the number of messages the stream holds
on ``agent.dlq.<group>``. The group's name is the one its members here gave;
for groups of other processes it is read back from the durable name
(``durable_name`` keeps ``[A-Za-z0-9_-]``, so ``a:b`` reads as ``a_b``).
Cost: one CONSUMER.LIST request per 256 consumers and one STREAM.INFO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.translate import translate
from squadbus.core import subjects
from squadbus.core.backend import GroupFigures, group_of

if TYPE_CHECKING:
    from squadbus.backends.nats.backend import NatsBackend

_PAGE = 256  # the server's CONSUMER.LIST page size
_MAX_PAGES = 64
_DLQ = subjects.DLQ_PREFIX + "."


async def list_consumers(js: JetStreamContext, stream: str) -> list[api.ConsumerInfo]:
    """Every consumer of ``stream``, page by page (at most 64 pages of 256)."""
    found: list[api.ConsumerInfo] = []
    for _ in range(_MAX_PAGES):
        page = await js.consumers_info(stream, offset=len(found) or None)
        found.extend(page)
        if len(page) < _PAGE:
            break
    return found


async def dead_letter_counts(js: JetStreamContext, stream: str) -> dict[str, int]:
    """Messages the stream holds per dead-letter subject, keyed by group (the subject's last token)."""
    info = await js.stream_info(stream, subjects_filter=_DLQ + ">")
    return {subject[len(_DLQ):]: count for subject, count in (info.state.subjects or {}).items()}


async def group_figures(backend: NatsBackend) -> list[GroupFigures]:
    """One :class:`GroupFigures` per durable consumer of the backend's stream."""
    js, stream = backend.js, backend.settings.stream
    named = {sub.consumer: sub.group for sub in backend._subs if sub.group is not None}
    try:
        consumers = await list_consumers(js, stream)
        dead = await dead_letter_counts(js, stream)
    except Exception as exc:
        raise translate(exc, f"describe the consumers of stream {stream}") from exc
    out = []
    for info in consumers:
        config = info.config
        if not config.durable_name:
            continue  # an ephemeral (group=None) subscription
        group = named.get(info.name) or group_of(info.name) or info.name
        out.append(GroupFigures(
            group=group,
            subject=config.filter_subject or ">",
            lag=info.num_pending,
            pending=info.num_ack_pending,
            dead_letters=dead.get(group, 0),
            redeliveries=info.num_redelivered,
        ))
    return out
