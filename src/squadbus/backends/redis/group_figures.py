"""Consumer-group figures of the Redis backend (``DescribesGroups``) from ``XINFO GROUPS``.

Every group a member ever created is in the ``<prefix>:groups`` hash (Redis
group name -> pattern, written by ``GroupSource.ensure_groups``), so
groups of every process are found. A group lives on the streams its pattern
reads (:meth:`KeyLayout.streams_for`); its figures are summed over them:

* ``lag``: XINFO GROUPS ``lag``, entries of the stream the group has not read
  yet. A wildcard group reads the partition streams, which hold every subject,
  so this also counts entries its pattern will skip. ``None`` when Redis
  cannot tell (it reports no lag after entries were deleted in the middle of
  a stream until the group has read past them).
* ``pending``: XINFO GROUPS ``pending``, entries read and not acknowledged
  (in a handler, in a member's local queue, or waiting for a redelivery).
* ``dead_letters``: ``XLEN`` of the group's ``agent.dlq.<group>`` subject
  stream (what retention kept).
* ``redeliveries``: ``None`` (Redis keeps a delivery count per pending entry
  only; reading them is an XPENDING scan per stream).

The group's name is the one its members here gave (``named``), else read
back from the durable name. Cost: one HGETALL, one pipeline of an XINFO
GROUPS per stream involved and one of an XLEN per group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from squadbus.backends.redis._driver import FAILURES, aioredis, call, queue, redis_errors, translate
from squadbus.backends.redis.layout import KeyLayout
from squadbus.core import subjects
from squadbus.core.backend import GroupFigures, group_of


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(info: Mapping[Any, Any], name: str) -> Any:
    return info.get(name.encode(), info.get(name))


async def group_figures(
    client: aioredis.Redis, layout: KeyLayout, *, named: Mapping[str, str] | None = None
) -> list[GroupFigures]:
    """One :class:`GroupFigures` per Redis consumer group of ``layout``.

    ``named`` maps Redis group names (``durable_name(group, pattern)``) to the
    group names this process's members use. Raises a BackendError when Redis
    does not answer.
    """
    named = named or {}
    try:
        registered = await call(client, "HGETALL", layout.groups)
        groups = {_text(k): _text(v) for k, v in dict(registered).items()}
        streams = sorted({s for pattern in groups.values() for s in layout.streams_for(pattern)})
        infos: dict[str, dict[str, Mapping[Any, Any]]] = {}
        if streams:
            async with client.pipeline(transaction=False) as pipe:
                for stream in streams:
                    queue(pipe, "XINFO", "GROUPS", stream)
                replies = await pipe.execute(raise_on_error=False)
            for stream, reply in zip(streams, replies, strict=True):
                if isinstance(reply, redis_errors.ResponseError):
                    continue  # the stream is gone (no such key): no group on it
                if isinstance(reply, Exception):
                    raise reply
                infos[stream] = {_text(_field(info, "name")): info for info in reply}
        names = {redis_group: named.get(redis_group) or group_of(redis_group) or redis_group for redis_group in groups}
        wanted = sorted(set(names.values()))
        lengths: dict[str, int | None] = {}
        if wanted:
            async with client.pipeline(transaction=False) as pipe:
                for name in wanted:
                    queue(pipe, "XLEN", layout.subject_stream(f"{subjects.DLQ_PREFIX}.{name}"))
                replies = await pipe.execute(raise_on_error=False)
            for name, reply in zip(wanted, replies, strict=True):
                if isinstance(reply, Exception) and not isinstance(reply, redis_errors.ResponseError):
                    raise reply
                lengths[name] = None if isinstance(reply, Exception) else int(reply)
    except FAILURES as exc:
        raise translate(exc, "describe the consumer groups") from exc
    out = []
    for redis_group, pattern in sorted(groups.items()):
        lag: int | None = 0
        pending = 0
        found = False
        for stream in layout.streams_for(pattern):
            info = infos.get(stream, {}).get(redis_group)
            if info is None:
                continue
            found = True
            pending += int(_field(info, "pending") or 0)
            stream_lag = _field(info, "lag")
            lag = None if lag is None or stream_lag is None else lag + int(stream_lag)
        if not found:
            continue  # registered, but its streams are gone (data loss, or a prefix reused)
        name = names[redis_group]
        out.append(GroupFigures(group=name, subject=pattern, lag=lag, pending=pending,
                                dead_letters=lengths.get(name)))
    return out
