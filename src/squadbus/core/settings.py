"""Settings: the only place squadbus reads the environment.

``Settings.from_env()`` reads:

* ``SQUADBUS_URL``: backend URL (``memory://``, ``redis://…``, ``nats://…``,
  ``kafka://…``, ``dual://<primary>|<secondary>``);
* ``MESSAGE_BUS``: the guide's switch, ``memory|redis|nats|kafka``, used when
  ``SQUADBUS_URL`` is unset, mapped to that backend's local default URL;
* ``SQUADBUS_DATA_DIR``: where runtime files go (the default SQLite store
  ``squadbus.db``, the audit log ``audit.jsonl``); default
  ``$XDG_DATA_HOME/squadbus``, i.e. ``~/.local/share/squadbus``. Never the
  current directory, so a run inside a checkout leaves nothing in it;
* ``SQUADBUS_STORE_URL``: history store (default: SQLite in the data directory);
* ``SQUADBUS_API``, ``SQUADBUS_TOKEN``: a running service the CLI talks to
  (see ``squadbus --help``);
* ``SQUADBUS_MAX_CONTENT_BYTES``: content size limit (default 1 MiB);
* ``SQUADBUS_TOKENS_FILE``: bearer tokens for the HTTP service;
* ``SQUADBUS_HOST_ID``: a stable name for this host process (durable broadcast
  subscription for its inboxes, see :mod:`squadbus.core.broadcasts`);
* ``SQUADBUS_TRACING``: ``1``/``true``/``yes``/``on`` turns OpenTelemetry tracing
  on (default off; ``0``/``false``/``no``/``off``), see :mod:`squadbus.core.tracing`;
* ``SQUADBUS_A2A``: ``0``/``false``/``no``/``off`` keeps the A2A edge off the
  HTTP service (default on when ``squadbus[a2a]`` is installed), see docs/a2a.md;
* ``SQUADBUS_A2A_WEBHOOK_ALLOW``: CIDRs and host names (comma- or space-separated) that A2A
  push webhooks may reach although they are loopback, private or link-local (docs/security.md).
"""

from __future__ import annotations

import enum
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import msgspec

from squadbus.core.envelope import DEFAULT_MAX_CONTENT_BYTES
from squadbus.core.errors import ConfigError

DEFAULT_URL = "memory://"
STORE_FILE = "squadbus.db"
AUDIT_FILE = "audit.jsonl"

MESSAGE_BUS_URLS: Mapping[str, str] = {
    "memory": "memory://",
    "redis": "redis://127.0.0.1:6379/0",
    "nats": "nats://127.0.0.1:4222",
    "kafka": "kafka://127.0.0.1:9092",
}


TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def flag(name: str, value: str | None) -> bool:
    """The boolean of environment variable ``name`` set to ``value`` (unset: False); ConfigError if not a boolean."""
    word = (value or "").strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name}={value!r}: expected one of 1, true, yes, on, 0, false, no, off")


def url_options(cls: type, query: str, *, scheme: str, names: Iterable[str]) -> dict[str, Any]:
    """The ``?name=value`` options of a backend or store URL, converted for dataclass ``cls``.

    Each value becomes its field's type by msgspec's conversion (int, float,
    str, ``X | None``, enums by value, bools: ``1/true/yes/on`` and
    ``0/false/no/off``, any case); the last of a repeated name wins. ``names``
    are the options allowed. A ConfigError names an unknown option (and the
    known ones) or a value that does not convert.
    """
    allowed = set(names)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, raws in parse_qs(query, keep_blank_values=True).items():
        if name not in allowed:
            raise ConfigError(f"unknown {scheme}:// option {name!r}; known: {', '.join(sorted(allowed))}")
        raw = raws[-1]
        kind = hints[name]
        word = raw.strip().lower()
        if kind is bool and word in TRUE_WORDS | FALSE_WORDS:
            values[name] = word in TRUE_WORDS
            continue
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            raw = word
        try:
            values[name] = msgspec.convert(raw, type=kind, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"bad {scheme}:// option {name}={raw!r}: {exc}") from exc
    return values


def default_data_dir(environ: Mapping[str, str]) -> str:
    """``$XDG_DATA_HOME/squadbus``, else ``~/.local/share/squadbus`` (XDG base directory spec)."""
    base = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return str(Path(base) / "squadbus")


def data_dir_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``SQUADBUS_DATA_DIR`` of ``environ`` (default ``os.environ``), else :func:`default_data_dir`."""
    env = os.environ if environ is None else environ
    return env.get("SQUADBUS_DATA_DIR") or default_data_dir(env)


def sqlite_url(path: str | Path) -> str:
    """The store URL of the SQLite file at ``path`` (made absolute)."""
    return f"sqlite+aiosqlite:///{Path(path).absolute()}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Process-wide settings, built once at start and passed down.

    ``data_dir`` (empty: :func:`default_data_dir` of the process environment)
    holds the runtime files; ``store_url`` (empty: ``squadbus.db`` in
    ``data_dir``) is the history store. Both are resolved on construction.
    """

    url: str = DEFAULT_URL
    data_dir: str = ""
    store_url: str = ""
    max_content_bytes: int = DEFAULT_MAX_CONTENT_BYTES
    tokens_file: str | None = None
    api_url: str | None = None
    api_token: str | None = None
    host_id: str | None = None
    """``SQUADBUS_HOST_ID``: a stable name for this host process; its inboxes' broadcast subscription is
    then the durable group ``inbox-host-<host_id>`` (see :mod:`squadbus.core.broadcasts`)."""
    tracing: bool = False
    """``SQUADBUS_TRACING``: OpenTelemetry spans and trace context in the headers (needs ``squadbus[otel]``)."""
    a2a: bool = True
    """``SQUADBUS_A2A``: the HTTP service mounts the A2A edge when ``squadbus[a2a]`` is installed (docs/a2a.md)."""
    a2a_webhook_allow: tuple[str, ...] = ()
    """``SQUADBUS_A2A_WEBHOOK_ALLOW``: CIDRs and host names A2A push webhooks may reach although not public."""

    def __post_init__(self) -> None:
        if not self.data_dir:
            object.__setattr__(self, "data_dir", default_data_dir(os.environ))
        if not self.store_url:
            object.__setattr__(self, "store_url", sqlite_url(Path(self.data_dir) / STORE_FILE))
        if "://" not in self.url:
            raise ConfigError(f"backend URL {self.url!r} has no scheme (expected e.g. memory://)")
        if self.max_content_bytes < 1:
            raise ConfigError("max_content_bytes must be positive")

    @property
    def audit_path(self) -> str:
        """The default audit log file: ``audit.jsonl`` in the data directory."""
        return str(Path(self.data_dir) / AUDIT_FILE)

    @property
    def default_store(self) -> bool:
        """True when the store is the default SQLite file of the data directory."""
        return self.store_url == sqlite_url(Path(self.data_dir) / STORE_FILE)

    def with_url(self, url: str) -> Settings:
        """A copy with another backend URL."""
        return replace(self, url=url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``); raises ConfigError on bad values."""
        env = os.environ if environ is None else environ
        url = env.get("SQUADBUS_URL")
        if not url:
            kind = env.get("MESSAGE_BUS", "memory").strip().lower()
            if kind not in MESSAGE_BUS_URLS:
                raise ConfigError(f"MESSAGE_BUS={kind!r}: expected one of {', '.join(MESSAGE_BUS_URLS)}")
            url = MESSAGE_BUS_URLS[kind]
        raw_limit = env.get("SQUADBUS_MAX_CONTENT_BYTES")
        try:
            limit = int(raw_limit) if raw_limit else DEFAULT_MAX_CONTENT_BYTES
        except ValueError as exc:
            raise ConfigError(f"SQUADBUS_MAX_CONTENT_BYTES={raw_limit!r} is not an integer") from exc
        return cls(
            url=url,
            data_dir=data_dir_from_env(env),
            store_url=env.get("SQUADBUS_STORE_URL") or "",
            max_content_bytes=limit,
            tokens_file=env.get("SQUADBUS_TOKENS_FILE") or None,
            api_url=env.get("SQUADBUS_API") or None,
            api_token=env.get("SQUADBUS_TOKEN") or None,
            host_id=env.get("SQUADBUS_HOST_ID") or None,
            tracing=flag("SQUADBUS_TRACING", env.get("SQUADBUS_TRACING")),
            a2a=env.get("SQUADBUS_A2A") is None or flag("SQUADBUS_A2A", env.get("SQUADBUS_A2A")),
            a2a_webhook_allow=tuple(env.get("SQUADBUS_A2A_WEBHOOK_ALLOW", "").replace(",", " ").split()),
        )
