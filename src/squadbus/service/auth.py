"""Bearer-token authentication and role checks for the HTTP service.

The tokens file is JSON (path in ``Settings.tokens_file``)::

    {"tokens": [
        {"token": "s3cr3t-dev-1", "role": "agent", "agent_id": "dev-1"},
        {"token": "s3cr3t-board", "role": "viewer"},
        {"token": "s3cr3t-ops",   "role": "admin"}
    ]}

Roles:

* ``agent``: sends messages only with its own ``agent_id`` as ``sender_id``;
  reads history and SSE;
* ``viewer``: reads history, SSE and metrics, sends nothing;
* ``admin``: everything.

A missing or unknown token gets 401, a known token without the right gets 403.
Without a tokens file the service is *open*: every request acts as admin. The
CLI refuses to serve open on anything but a loopback address.

Tokens are kept only as SHA-256 digests, so a lookup never compares secrets
character by character.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from squadbus.core import subjects
from squadbus.core.errors import ConfigError, InvalidSubject


class Role(enum.Enum):
    """What a token may do."""

    AGENT = "agent"
    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as."""

    role: Role
    agent_id: str | None = None
    name: str = ""

    def can_read(self) -> bool:
        """Every role reads history and SSE."""
        return True

    def can_send_as(self, sender_id: str) -> bool:
        """Admins send as anyone, agents only as themselves, viewers never."""
        if self.role is Role.ADMIN:
            return True
        return self.role is Role.AGENT and self.agent_id == sender_id


OPEN_PRINCIPAL = Principal(Role.ADMIN, name="open")
"""The principal of every request when the service runs without tokens."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenTable:
    """Token digests mapped to principals; an empty table means open mode."""

    entries: Mapping[str, Principal]

    @property
    def open(self) -> bool:
        """True when no tokens are configured: every request is admin."""
        return not self.entries

    def lookup(self, token: str) -> Principal | None:
        """The principal of ``token``, or None when unknown."""
        return self.entries.get(_digest(token))

    @classmethod
    def empty(cls) -> TokenTable:
        """Open mode."""
        return cls({})

    @classmethod
    def from_file(cls, path: str | Path) -> TokenTable:
        """Load a tokens file; raises ConfigError naming the problem."""
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {path}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"tokens file {path} is not JSON: {exc}") from exc
        return cls.from_mapping(raw, source=str(path))

    @classmethod
    def from_mapping(cls, raw: object, *, source: str = "tokens") -> TokenTable:
        """Build from the parsed JSON document ``{"tokens": [...]}``."""
        items = raw.get("tokens") if isinstance(raw, dict) else None
        if not isinstance(items, list) or not items:
            raise ConfigError(f'{source}: expected {{"tokens": [{{"token": ..., "role": ...}}, ...]}} with entries')
        entries: dict[str, Principal] = {}
        for index, item in enumerate(items):
            where = f"{source}: tokens[{index}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where} must be an object")
            token, role_name, agent_id = item.get("token"), item.get("role"), item.get("agent_id")
            if not isinstance(token, str) or len(token) < 8:
                raise ConfigError(f"{where}: token must be a string of at least 8 characters")
            try:
                role = Role(role_name)
            except ValueError:
                raise ConfigError(f"{where}: role must be one of agent, viewer, admin") from None
            if role is Role.AGENT:
                try:
                    subjects.validate_token(str(agent_id or ""), what="agent_id")
                except InvalidSubject as exc:
                    raise ConfigError(f"{where}: an agent token needs a valid agent_id ({exc})") from exc
            elif agent_id is not None:
                raise ConfigError(f"{where}: only agent tokens carry an agent_id")
            key = _digest(token)
            if key in entries:
                raise ConfigError(f"{where}: duplicate token")
            name = str(item.get("name") or (agent_id if role is Role.AGENT else role.value))
            entries[key] = Principal(role, agent_id if role is Role.AGENT else None, name)
        return cls(entries)


def load_tokens(tokens_file: str | None) -> TokenTable:
    """The token table for ``Settings.tokens_file`` (None = open mode)."""
    return TokenTable.empty() if tokens_file is None else TokenTable.from_file(tokens_file)


# ---- FastAPI glue ---------------------------------------------------------------------------

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token from the tokens file (roles: agent, viewer, admin). Not needed when the service runs open.",
)


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def identify(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The caller of ``request``; raises 401 when a token is needed and missing or unknown."""
    table: TokenTable = request.app.state.tokens
    if table.open:
        return OPEN_PRINCIPAL
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    found = table.lookup(credentials.credentials)
    if found is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "unknown bearer token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return found


# The two dependencies below each resolve the token themselves rather than
# depending on a shared one: every dependency level costs FastAPI time per request.


async def reader(request: Request, credentials: Credentials) -> Principal:
    """Any authenticated caller (history, SSE, metrics)."""
    return identify(request, credentials)


async def overseer(request: Request, credentials: Credentials) -> Principal:
    """A caller who may read every agent's messages at once (viewer or admin; agent tokens get 403)."""
    who = identify(request, credentials)
    if who.role is Role.AGENT:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "agent tokens cannot follow the whole squad's messages")
    return who


async def sender(request: Request, credentials: Credentials) -> Principal:
    """A caller allowed to send at all (agent or admin); the sender_id check is per message."""
    who = identify(request, credentials)
    if who.role is Role.VIEWER:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "viewer tokens cannot send messages")
    return who


def check_sender(who: Principal, sender_id: str) -> None:
    """Raise 403 unless ``who`` may send with ``sender_id``."""
    if not who.can_send_as(sender_id):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token of agent {who.agent_id!r} cannot send as sender_id {sender_id!r}",
        )
