"""The one place that imports redis-py, and the translation of its errors."""

from __future__ import annotations

try:
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
    from redis.asyncio.client import Pipeline
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the Redis backend needs redis-py: pip install 'squadbus[redis]'") from exc

from typing import Any

from squadbus.core.errors import BackendError, BackendTimeout, ConnectionLost, PublishFailed

__all__ = [
    "FAILURES",
    "RETRYABLE",
    "TRANSIENT",
    "aioredis",
    "call",
    "is_nogroup",
    "no_retry",
    "queue",
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


def no_retry() -> Retry:
    """redis-py's own retries off: squadbus retries with its own backoff and deadlines, visibly."""
    return Retry(NoBackoff(), 0)


async def call(client: aioredis.Redis, *args: Any, **options: Any) -> Any:
    """``client.execute_command`` with its reply parsed by redis-py's callbacks (``options`` go to them)."""
    return await client.execute_command(*args, **options)  # type: ignore[no-untyped-call]


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
