"""Open inboxes of a Redis squad (``ListsInboxes``), read from the inbox leases.

An open inbox is served by the one backend instance holding its lease
``<prefix>:lease:<agent>`` (:mod:`.inboxes`): the key exists while an instance
serves the agent and is deleted when it closes; a holder that died leaves it
until its ``PX`` lapses (``max(ack_wait, 3 claim intervals)``). The key's value
is the holder's consumer name (``host-pid-suffix``). Redis keeps no time of
taking, so ``since`` is None.

Cost: ``SCAN MATCH <prefix>:lease:* COUNT 1000`` over the whole database (a
round trip per 1,000 keys of the database, whatever their kind), then one
pipelined ``GET`` per lease found.
"""

from __future__ import annotations

from squadbus.backends.redis._driver import FAILURES, aioredis, call, queue, redis_errors, translate
from squadbus.backends.redis.layout import KeyLayout
from squadbus.core.inbox_source import InboxPresence

_SCAN_COUNT = 1000
_GLOB = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def open_inboxes(client: aioredis.Redis, layout: KeyLayout) -> list[InboxPresence]:
    """One :class:`InboxPresence` per lease key of ``layout``; raises a BackendError when Redis does not answer."""
    head = layout.lease("")
    match = head.translate(_GLOB) + "*"
    keys: list[str] = []
    try:
        cursor: int | bytes = 0
        while True:
            cursor, found = await call(client, "SCAN", cursor, "MATCH", match, "COUNT", _SCAN_COUNT)
            keys.extend(_text(k) for k in found)
            if int(cursor) == 0:
                break
        keys = sorted(set(keys))
        if not keys:
            return []
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                queue(pipe, "GET", key)
            holders = await pipe.execute(raise_on_error=False)
    except FAILURES as exc:
        raise translate(exc, "list the open inboxes") from exc
    out = []
    for key, holder in zip(keys, holders, strict=True):
        if holder is None or isinstance(holder, redis_errors.ResponseError):
            continue  # released (or lapsed) between the SCAN and the GET
        if isinstance(holder, Exception):
            raise translate(holder, "list the open inboxes") from holder
        out.append(InboxPresence(agent_id=key[len(head):], holder=_text(holder)))
    return out
