"""The one place that imports redis-py (and hiredis, its parser and packer), and the translation of its errors."""

from __future__ import annotations

from dataclasses import dataclass

try:
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
    from hiredis import pack_command as _pack_command
    from redis.asyncio.client import Pipeline
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the Redis backend needs redis-py: pip install 'squadbus[redis]'") from exc

import weakref
from collections.abc import Iterable
from typing import Any

from squadbus.core.errors import BackendError, BackendTimeout, ConnectionLost, PublishFailed

__all__ = [
    "FAILURES",
    "RETRYABLE",
    "TRANSIENT",
    "PackedCommand",
    "Reconnects",
    "aioredis",
    "call",
    "entry_parts",
    "execute_each",
    "execute_packed",
    "execute_streamed",
    "is_nogroup",
    "no_retry",
    "queue",
    "read_streams",
    "redis_errors",
    "translate",
]

RETRYABLE: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes BusyLoadingError (server still loading its AOF)
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica being promoted
    ConnectionError,
    OSError,
)
"""Errors after which the same command may succeed once Redis is back."""

TRANSIENT: tuple[type[BaseException], ...] = (TimeoutError, *RETRYABLE)
"""RETRYABLE plus our own asyncio timeouts."""

FAILURES: tuple[type[BaseException], ...] = (TimeoutError, *RETRYABLE, redis_errors.RedisError)
"""Anything a Redis command can fail with."""


class Reconnects:
    """Counts the times a client's pooled connections connected *again* (Redis restarted, a link broke).

    redis-py reconnects a broken pooled connection silently when it hands it out, so a command
    after a server crash succeeds and nothing tells the caller that replies may have been lost
    (an XREADGROUP whose entries are in our pending list, never received). Group members compare
    :attr:`count` around their reads and take such entries back (see ``GroupSource`` in group.py).
    First connections of new pooled connections are not counted.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.count = 0
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        pool = client.connection_pool
        make = pool.make_connection

        # ConnectionPool.make_connection is documented as the point to override; the pool is built
        # inside redis.asyncio.Redis (TLS and all), so it is wrapped here rather than rebuilt.
        def make_connection() -> Any:
            connection = make()  # type: ignore[no-untyped-call]
            connection.register_connect_callback(self._connected)
            return connection

        pool.make_connection = make_connection  # type: ignore[method-assign]

    def _connected(self, connection: Any) -> None:
        if connection in self._seen:
            self.count += 1
        else:
            self._seen.add(connection)


def no_retry() -> Retry:
    """redis-py's own retries off: squadbus retries with its own backoff and deadlines, visibly."""
    return Retry(NoBackoff(), 0)


async def call(client: aioredis.Redis, *args: Any, **options: Any) -> Any:
    """``client.execute_command`` with its reply parsed by redis-py's callbacks (``options`` go to them)."""
    return await client.execute_command(*args, **options)  # type: ignore[no-untyped-call]


class PackedCommand:
    """One command in Redis' wire form (RESP), packed by hiredis (``hiredis.pack_command``).

    Arguments are ``bytes``, ``str`` or ``int``. The publish call adds its messages' arguments already
    in wire form (:meth:`add_packed`): ``publisher._scripts`` formats a message's six arguments with
    one ``%`` each, 1.16 µs per message against 2.68 µs for building the same arguments and packing
    them with ``hiredis.pack_command`` (256 messages of 1 KiB per call, best of 7; python 3.11,
    hiredis 3.5); every other command is packed by hiredis alone, which is twice as fast as packing
    argument by argument in Python (0.50 against 0.98 µs for four arguments).
    """

    __slots__ = ("_args", "_count", "_parts")

    def __init__(self, *args: bytes | str | int) -> None:
        self._args = args
        self._parts: list[bytes] = []
        self._count = 0

    def add_packed(self, count: int, parts: list[bytes]) -> None:
        """Append ``count`` arguments already in wire form, as the byte strings ``parts``."""
        self._parts += parts
        self._count += count

    def pieces(self) -> list[bytes]:
        """The command's wire form as byte strings to be written one after another."""
        packed: bytes = _pack_command(self._args)  # type: ignore[arg-type]  # its stub types a 1-tuple
        if not self._count:
            return [packed]
        # hiredis counted only the arguments it packed: the array header is written again.
        return [b"*%d\r\n" % (len(self._args) + self._count), packed[packed.index(b"\r\n") + 2:], *self._parts]


async def execute_packed(client: aioredis.Redis, *commands: PackedCommand) -> list[Any]:
    """Send ``commands`` in one write on one pooled connection and read their replies, unparsed.

    An error reply raises its ``ResponseError`` once every reply was read (the
    connection stays in step); a connection failure raises redis-py's
    ``ConnectionError``/``TimeoutError`` and drops the connection.
    """
    # One bytes object for every command: the transport's writelines joins a list again (a copy of
    # the whole write, often > 128 KiB, which malloc maps fresh each time: ~0.75 page faults per
    # published message); a list of one is written as it is.
    return await _execute(client, [b"".join([piece for command in commands for piece in command.pieces()])],
                          len(commands))


async def execute_each(client: aioredis.Redis, commands: Iterable[PackedCommand]) -> list[Any]:
    """Like :func:`execute_packed`, but an error reply does not raise: it is the ``ResponseError`` in
    its place in the list (commands about different keys whose failures are handled one by one)."""
    commands = list(commands)
    if not commands:
        return []
    data = b"".join([piece for command in commands for piece in command.pieces()])
    return await _execute(client, [data], len(commands), raise_errors=False)


@dataclass(slots=True)
class WriteLog:
    """How many commands a call wrote to a connection: once one is written, Redis may have run it,
    whatever error follows (the publisher then says "not confirmed", not "not reachable")."""

    written: int = 0


async def execute_streamed(
    client: aioredis.Redis, commands: Iterable[PackedCommand], log: WriteLog | None = None
) -> list[Any]:
    """Like :func:`execute_packed`, but each command is written as soon as ``commands`` yields it,
    so Redis runs one while the next is being packed; then every reply is read. ``log`` counts the
    commands written."""
    return await _execute(client, (b"".join(command.pieces()) for command in commands), None, log)


async def _execute(
    client: aioredis.Redis, writes: Iterable[bytes], count: int | None, log: WriteLog | None = None,
    *, raise_errors: bool = True,
) -> list[Any]:
    """Write each of ``writes`` on one pooled connection, then read one reply per command (``count``,
    or one per write); an error reply raises once all are read, unless ``raise_errors`` is False."""
    pool = client.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        written = 0
        for data in writes:
            await conn.send_packed_command([data])
            written += 1
            if log is not None:
                log.written += 1
        replies: list[Any] = []
        error: redis_errors.ResponseError | None = None
        for _ in range(written if count is None else count):
            try:
                replies.append(await conn.read_response())
            except redis_errors.ResponseError as exc:
                error = error or exc
                replies.append(exc)
        if error is not None and raise_errors:
            raise error
        return replies
    except redis_errors.ResponseError:
        raise
    except BaseException:  # a failed connection, or a bug while packing with replies unread
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


RawEntry = list[Any]
"""One stream entry as Redis sent it: ``[entry id, [field, value, ...] or None]``."""
StreamEntries = list[tuple[str, list[RawEntry]]]


async def read_streams(client: aioredis.Redis, *args: bytes | str | int) -> StreamEntries:
    """Run an ``XREAD``/``XREADGROUP`` and return ``[(stream, [[entry id, raw fields or None]])]``.

    The reply is taken as parsed by hiredis (RESP2 list or RESP3 map), not
    converted by redis-py's generic callbacks; the entries are left as Redis
    sent them (read their subject and payload with :func:`entry_parts`): no object per entry
    is made here. ``None`` fields mean the entry was deleted while pending.
    """
    (reply,) = await execute_packed(client, PackedCommand(*args))
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(stream.decode(), entries) for stream, entries in pairs]


def entry_parts(raw: list[bytes] | dict[bytes, bytes]) -> tuple[bytes | None, bytes | None]:
    """``(subject, payload)`` of a stream entry: its ``s`` and ``m`` fields, None where missing.

    ``raw`` is the entry's fields as Redis sent them (a flat list) or as a
    dict. The layouts squadbus writes (``m``; ``s m``; ``s x m``) are read by
    position, without a dict per entry; anything else goes through a dict, so
    a repeated field counts as a dict would count it (the last one).
    """
    if isinstance(raw, dict):
        return raw.get(b"s"), raw.get(b"m")
    n = len(raw)
    if n == 4 and raw[0] == b"s" and raw[2] == b"m":
        return raw[1], raw[3]
    if n == 2 and raw[0] == b"m":
        return None, raw[1]
    if n == 6 and raw[0] == b"s" and raw[2] == b"x" and raw[4] == b"m":
        return raw[1], raw[5]
    fields = dict(zip(raw[::2], raw[1::2]))  # noqa: B905 - Redis sends field, value pairs
    return fields.get(b"s"), fields.get(b"m")


def queue(pipe: Pipeline, *args: Any, **options: Any) -> None:
    """Queue a raw command on a pipeline."""
    pipe.execute_command(*args, **options)


def is_nogroup(exc: BaseException) -> bool:
    """True for the error Redis gives when a stream or its group is missing (e.g. after data loss)."""
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("NOGROUP")


def translate(exc: BaseException, what: str) -> BackendError:
    """The squadbus error for a redis-py error raised while doing ``what``."""
    if isinstance(exc, redis_errors.TimeoutError | TimeoutError):
        return BackendTimeout(f"{what}: Redis did not answer in time ({exc})")
    if isinstance(exc, RETRYABLE):
        return ConnectionLost(f"{what}: Redis is not reachable ({exc})")
    return PublishFailed(f"{what}: {exc}")
