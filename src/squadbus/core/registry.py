"""Backend lookup by URL scheme.

Backends register by module path, imported only when their scheme is used, so
the core never imports a driver. Each backend module has a ``from_url(url)``
function returning a :class:`~squadbus.core.backend.Backend`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from squadbus.core.backend import Backend
from squadbus.core.errors import ConfigError

BACKEND_MODULES: Mapping[str, str] = {
    "memory": "squadbus.backends.memory",
    "redis": "squadbus.backends.redis",
    "rediss": "squadbus.backends.redis",
    "nats": "squadbus.backends.nats",
    "tls": "squadbus.backends.nats",
    "kafka": "squadbus.backends.kafka",
    "dual": "squadbus.backends.dual",
    "amqp": "squadbus.backends.rabbitmq",
    "amqps": "squadbus.backends.rabbitmq",
}


def scheme_of(url: str) -> str:
    """The lower-cased scheme of ``url``; raises ConfigError when there is none."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigError(f"backend URL {url!r} has no scheme (expected e.g. memory://)")
    return scheme


def open_backend(url: str) -> Backend:
    """Build (not connect) the backend named by ``url``."""
    scheme = scheme_of(url)
    module_path = BACKEND_MODULES.get(scheme)
    if module_path is None:
        raise ConfigError(f"unknown backend scheme {scheme!r}; known: {', '.join(sorted(BACKEND_MODULES))}")
    module = importlib.import_module(module_path)
    backend: Backend = module.from_url(url)
    return backend
