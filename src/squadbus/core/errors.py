"""The one exception tree of squadbus.

Every error squadbus raises derives from :class:`SquadbusError`; backends
translate their driver's errors at the edge with ``raise ... from exc``::

    SquadbusError
    ├── ConfigError (also ValueError)          bad URL, bad setting, missing driver
    ├── InvalidMessage (also ValueError)       envelope failed validation
    │   ├── MalformedMessage                   bytes that are not a valid envelope
    │   ├── MessageTooLarge                    content over the configured limit
    │   └── InvalidSubject                     empty token, wildcard in a publish subject, ...
    ├── BackendError                           the broker did not do what was asked
    │   ├── ConnectionLost                     not connected and could not reconnect in time
    │   ├── PublishFailed                      the broker refused or lost a publish
    │   └── BackendTimeout                     the broker did not answer in time
    ├── RequestTimeout (also TimeoutError)     no reply to Bus.request in time
    ├── ReceiveTimeout (also TimeoutError)     nothing arrived in an inbox in time
    ├── Closed                                 the Bus, backend or subscription was closed
    └── HandlerSignal                          raised by handlers to steer delivery
        ├── Nack                               redeliver (after an optional delay)
        ├── Retry                              redeliver after ``delay`` seconds
        └── Reject                             dead-letter now, no more attempts
"""

from __future__ import annotations


class SquadbusError(Exception):
    """Root of every error raised by squadbus."""


class ConfigError(SquadbusError, ValueError):
    """A URL, setting or optional driver is wrong or missing."""


class InvalidMessage(SquadbusError, ValueError):
    """A message failed validation; nothing was published."""


class MalformedMessage(InvalidMessage):
    """Bytes could not be decoded into a valid envelope."""


class MessageTooLarge(InvalidMessage):
    """A message's content is larger than the configured limit."""


class InvalidSubject(InvalidMessage):
    """A subject or subscription pattern does not follow the subject syntax."""


class BackendError(SquadbusError):
    """The backend failed to do what was asked."""


class ConnectionLost(BackendError):
    """The backend is not reachable and did not come back within the timeout."""


class PublishFailed(BackendError):
    """The backend refused a publish or could not confirm that it stored it."""


class BackendTimeout(BackendError, TimeoutError):
    """The backend did not answer within the timeout."""


class RequestTimeout(SquadbusError, TimeoutError):
    """No reply arrived for a request within its timeout."""


class ReceiveTimeout(SquadbusError, TimeoutError):
    """No delivery arrived in an inbox within the timeout of ``Inbox.get``."""


class Closed(SquadbusError):
    """The object was used after ``close()``."""


class HandlerSignal(SquadbusError):
    """Base for exceptions a handler raises to choose what happens to a delivery."""


class Nack(HandlerSignal):
    """Redeliver this message: after ``delay`` seconds, or when the backoff policy says.

    ``delay=None`` (the default): the consumer's backoff decides
    (``ConsumerOptions.backoff(attempt)``). A number is taken as it is, on every
    backend: ``0`` redelivers at once. Either way the attempt counts towards
    ``max_deliver``.
    """

    def __init__(self, reason: str = "nack", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Retry(Nack):
    """Redeliver this message after exactly ``delay`` seconds (``0``: at once)."""

    def __init__(self, delay: float, reason: str = "retry") -> None:
        super().__init__(reason, delay=delay)


class Reject(HandlerSignal):
    """Dead-letter this message now; it will not be redelivered."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
