"""aio-pika / aiormq errors mapped onto the squadbus exception tree (used with ``raise ... from exc``)."""

from __future__ import annotations

import aiormq.exceptions

from squadbus.core.errors import BackendError, BackendTimeout, ConnectionLost, PublishFailed

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ConnectionClosed,
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.ChannelClosed,
    ConnectionError,
    OSError,
)
"""Failures that mean "not connected now": a publish may get past them by retrying after a reconnect."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same operation after a pause may succeed (reconnecting, timeouts)."""
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed | aiormq.exceptions.ChannelAccessRefused):
        return False
    return isinstance(exc, (TimeoutError, *CONNECTION_ERRORS))


def translate(exc: BaseException, what: str) -> BackendError:
    """The most specific squadbus error for a driver failure while doing ``what``."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return PublishFailed(f"{what}: RabbitMQ refused the message (basic.nack or return)")
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"{what}: RabbitMQ did not answer in time")
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed | aiormq.exceptions.ChannelAccessRefused):
        return BackendError(f"{what}: RabbitMQ refused: {exc}")
    if isinstance(exc, CONNECTION_ERRORS):
        return ConnectionLost(f"{what}: not connected to RabbitMQ ({type(exc).__name__}: {exc})")
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")
