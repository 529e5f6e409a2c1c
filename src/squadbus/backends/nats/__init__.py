"""NATS JetStream backend (``nats://`` and ``tls://`` URLs); needs ``pip install squadbus[nats]``.

>>> backend = from_url("nats://127.0.0.1:4222?profile=durable&replicas=1")

See :mod:`.backend` for the mapping and docs/backends/nats.md for profiles,
costs and what each failure can lose.
"""

from __future__ import annotations

try:
    import nats.aio.client  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the NATS backend needs nats-py: pip install squadbus[nats]") from exc

from squadbus.backends.nats.backend import NatsBackend
from squadbus.backends.nats.settings import NatsSettings, Profile

__all__ = ["NatsBackend", "NatsSettings", "Profile", "from_url"]


def from_url(url: str) -> NatsBackend:
    """A NatsBackend (not connected) from a ``nats://`` or ``tls://`` URL; see :class:`NatsSettings`."""
    return NatsBackend(NatsSettings.from_url(url))
