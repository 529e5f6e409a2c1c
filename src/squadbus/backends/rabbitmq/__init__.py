"""RabbitMQ backend (``amqp://`` and ``amqps://`` URLs); needs ``pip install squadbus[rabbitmq]``.

>>> backend = from_url("amqp://guest:guest@127.0.0.1:5672/?namespace=squad")

See :mod:`.backend` for the mapping and docs/backends/rabbitmq.md for what it
costs and what each failure can lose.
"""

from __future__ import annotations

try:
    import aio_pika  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the RabbitMQ backend needs aio-pika: pip install squadbus[rabbitmq]") from exc

from squadbus.backends.rabbitmq.backend import RabbitBackend
from squadbus.backends.rabbitmq.settings import Profile, RabbitSettings

__all__ = ["Profile", "RabbitBackend", "RabbitSettings", "from_url"]


def from_url(url: str) -> RabbitBackend:
    """A RabbitBackend (not connected) from an ``amqp://`` or ``amqps://`` URL; see :class:`RabbitSettings`."""
    return RabbitBackend(RabbitSettings.from_url(url))
