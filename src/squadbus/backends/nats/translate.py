"""nats-py errors mapped onto the squadbus exception tree (used with ``raise ... from exc``)."""

from __future__ import annotations

import nats.errors
import nats.js.errors

from squadbus.core.errors import BackendError, BackendTimeout, ConnectionLost, PublishFailed

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoServersError,
    ConnectionError,
)


def is_transient(exc: BaseException) -> bool:
    """True for failures that a retry of the same publish may get past (leader election, reconnect)."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return True
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        # 503 "JetStream system temporarily unavailable" and similar raft hiccups.
        return exc.code == 503
    return isinstance(exc, (TimeoutError, nats.js.errors.TooManyStalledMsgsError, *_CONNECTION_ERRORS))


def is_unanswered(exc: BaseException) -> bool:
    """True when a publish that went out got no answer (its PubAck timed out, or the connection went
    away while waiting): the stream may have stored it. A "no responders" answer means it did not."""
    return isinstance(exc, (TimeoutError, *_CONNECTION_ERRORS))


def translate(exc: BaseException, what: str) -> BackendError:
    """The most specific squadbus error for a nats-py failure while doing ``what``."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionLost(f"{what}: not connected to NATS ({type(exc).__name__}: {exc})")
    if isinstance(exc, nats.js.errors.TooManyStalledMsgsError):
        return BackendTimeout(f"{what}: too many publishes waiting for a PubAck")
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"{what}: NATS did not answer in time")
    if isinstance(exc, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return PublishFailed(f"{what}: no JetStream stream answered (no leader, or the stream is missing)")
    if isinstance(exc, nats.js.errors.APIError):
        return PublishFailed(f"{what}: JetStream refused: {exc.description or exc} (code {exc.code})")
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")
