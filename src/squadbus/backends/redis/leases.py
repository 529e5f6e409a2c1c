"""Partition leases of an ordered consumer group: one member serves a stream at a time.

A group subscription reads a set of streams (every partition stream for a
wildcard pattern, one subject stream for a literal one). With
``ordered_groups`` each of them is a *partition* that one member owns at a
time, so an execution (whose messages are all in one stream, in publish
order) is handled by one member in order, also across a kill -9:

* **Lease** ``<prefix>:glease:<redis group>:<index>`` = the member's consumer
  name, ``PX lease`` (``lease`` = ``min(group_lease, ack_wait)``, 10 s by
  default), renewed every ``lease / 3`` by :data:`TICK_LUA`,
  which also refreshes the member's heartbeat (a score in the sorted set
  ``<prefix>:gmembers:<redis group>``), counts the live members and takes
  free partitions while the member owns fewer than
  ``ceil(partitions / live members)``.
* **Fence**: a read is either a plain ``XREADGROUP`` whose answer came back
  before the lease's deadline (so Redis ran it while the lease was this
  member's; an answer after it is not handed out, see
  ``GroupSource._fenced_read``), or :data:`READ_LUA`, which runs
  ``XREADGROUP`` only on the streams whose lease still holds this member's
  name, in the same atomic call (used when renewals are late).
* **Take-over**: a member that acquires a partition first claims every entry
  still pending on it (the previous owner's, in id order) and hands them out
  before it reads new ones. A member over its share gives partitions back:
  it stops reading them, lets the handlers finish, returns what is left to
  the group and deletes the lease (only if still its own), and another
  member takes them.

Take-over delay after a member dies: its leases expire ``lease`` after its
last renewal, and another member's next tick (every ``lease / 3``) takes
them: at most ``lease * 4 / 3`` plus one read wait (``min(block, lease / 4)``),
then the claimed backlog's handling time. The same holds for a lone member's
process restarted after a crash: its new member waits for the old leases.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any

from squadbus.backends.redis._driver import PackedCommand, aioredis, execute_packed, redis_errors

TICK_LUA = """
local members, base, me = ARGV[1], ARGV[2], ARGV[3]
local ttl, count, start = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', members, now + ttl, me)
redis.call('ZREMRANGEBYSCORE', members, '-inf', now)
redis.call('PEXPIRE', members, ttl * 2)
local live = redis.call('ZCARD', members)
local target = math.ceil(count / live)
local kept = {}
for i = 7, #ARGV do
  local key = base .. ARGV[i]
  if redis.call('GET', key) == me then
    redis.call('PEXPIRE', key, ttl)
    kept[#kept + 1] = tonumber(ARGV[i])
  end
end
if #kept < target then
  for j = 0, count - 1 do
    local p = (start + j) % count
    if redis.call('SET', base .. p, me, 'NX', 'PX', ttl) then
      kept[#kept + 1] = p
      if #kept >= target then break end
    end
  end
end
return {live, target, kept}
"""

READ_LUA = """
local group, me, count, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local streams, fenced = {}, {}
for i = 1, n do
  if redis.call('GET', ARGV[4 + i]) == me then
    streams[#streams + 1] = ARGV[4 + n + i]
  else
    fenced[#fenced + 1] = ARGV[4 + n + i]
  end
end
if #streams == 0 then return {false, fenced} end
local args = {'XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS'}
for _, s in ipairs(streams) do args[#args + 1] = s end
for _ = 1, #streams do args[#args + 1] = '>' end
return {redis.call(unpack(args)), fenced}
"""

DROP_LUA = """
local me = ARGV[1]
for i = 2, #ARGV do
  if redis.call('GET', ARGV[i]) == me then redis.call('DEL', ARGV[i]) end
end
return 1
"""

_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (TICK_LUA, READ_LUA, DROP_LUA)}


async def run_script(client: aioredis.Redis, script: str, *args: bytes | str | int) -> Any:
    """``EVALSHA`` of ``script`` (no keys, ``args`` as ARGV), loading it with ``EVAL`` when Redis lost it."""
    try:
        (reply,) = await execute_packed(client, PackedCommand("EVALSHA", _SHAS[script], 0, *args))
    except redis_errors.NoScriptError:
        (reply,) = await execute_packed(client, PackedCommand("EVAL", script, 0, *args))
    return reply


@dataclass(frozen=True, slots=True)
class Tick:
    """What one lease renewal found: live members, this member's share and the partitions it holds."""

    live: int
    target: int
    held: frozenset[int]


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One fenced read: the streams' entries (as ``read_streams`` gives them) and the streams whose
    lease is no longer this member's."""

    entries: list[tuple[str, list[Any]]]
    fenced: list[str]


class PartitionLeases:
    """The lease calls of one member of one group over ``streams`` (index = partition number)."""

    def __init__(self, client: aioredis.Redis, prefix: str, redis_group: str, consumer: str,
                 streams: list[str], ttl: float) -> None:
        self._client = client
        self._consumer = consumer
        self._streams = streams
        self._members = f"{prefix}:gmembers:{redis_group}"
        self._base = f"{prefix}:glease:{redis_group}:"
        self._ttl_ms = max(1, int(ttl * 1000))
        # Members start looking for free partitions at different places, so they rarely collide.
        self._start = zlib.crc32(consumer.encode()) % len(streams)

    def lease_key(self, index: int) -> str:
        return f"{self._base}{index}"

    async def tick(self, owned: set[int]) -> Tick:
        """Heartbeat, renew ``owned`` (those still ours come back in ``held``), take free partitions
        up to the share."""
        live, target, kept = await run_script(
            self._client, TICK_LUA, self._members, self._base, self._consumer, self._ttl_ms, len(self._streams),
            self._start, *sorted(owned),
        )
        return Tick(int(live), int(target), frozenset(int(p) for p in kept))

    async def read(self, redis_group: str, indexes: list[int], count: int) -> ReadResult:
        """``XREADGROUP ... >`` on the streams ``indexes`` whose lease is still this member's."""
        streams = [self._streams[i] for i in indexes]
        reply, fenced = await run_script(
            self._client, READ_LUA, redis_group, self._consumer, count, len(indexes),
            *(self.lease_key(i) for i in indexes), *streams,
        )
        entries = [(stream.decode(), page) for stream, page in reply] if reply else []
        return ReadResult(entries, [s.decode() for s in fenced])

    async def drop(self, indexes: list[int]) -> None:
        """Delete the leases ``indexes`` that are still this member's."""
        if indexes:
            await run_script(self._client, DROP_LUA, self._consumer, *(self.lease_key(i) for i in indexes))

    async def leave(self, indexes: list[int]) -> None:
        """Drop ``indexes`` and this member's heartbeat (closing: the others take over at once)."""
        await self.drop(indexes)
        await execute_packed(self._client, PackedCommand("ZREM", self._members, self._consumer))
