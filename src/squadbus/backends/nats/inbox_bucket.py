"""The KV bucket of NATS inboxes: cursors, leases and hub liveness (see :mod:`.inboxes`).

One bucket ``<stream>-inboxes`` per stream (history 1, direct gets, the stream's storage and
replicas). Reads are direct gets of a key's last revision; writes are pipelined publishes to
``$KV.<bucket>.<key>`` whose PubAcks come back through one subscription (revision-checked with
``Nats-Expected-Last-Subject-Sequence`` where asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSub
from nats.js import api
from nats.js.client import JetStreamContext

from squadbus.backends.nats.settings import NatsSettings, Profile
from squadbus.backends.nats.translate import translate

logger = logging.getLogger("squadbus.backends.nats.inboxes")

_WRONG_LAST = 10071

Put = tuple[str, bytes, int | None, dict[str, str] | None]
"""``(key, value, expected last revision or None, extra headers)``."""


def bucket_name(stream: str) -> str:
    """The KV bucket holding the inboxes' cursors and leases of ``stream``."""
    return f"{stream}-inboxes"


class _WrongLast(Exception):
    """A revision-checked KV put found another revision."""


class WrongLast(Exception):
    """A revision-checked KV put found another revision."""


class InboxBucket:
    """Reads and pipelined writes of the inboxes' KV bucket over the backend's connection."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: NatsSettings) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self.name = bucket_name(settings.stream)
        self.prefix = f"$KV.{self.name}."
        self._get_subject = f"$JS.API.DIRECT.GET.KV_{self.name}"
        self._replies: NatsSub | None = None
        self._reply_prefix = ""
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._count = 0

    async def start(self) -> None:
        """Create the bucket if it is missing and subscribe for the PubAcks of writes."""
        await self._ensure()
        self._reply_prefix = self._nc.new_inbox()
        self._replies = await self._nc.subscribe(self._reply_prefix + ".*", cb=self._on_reply)

    async def close(self) -> None:
        """Stop listening for PubAcks (writes in flight fail with a timeout)."""
        if self._replies is not None and not self._nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await self._replies.unsubscribe()

    async def entry(self, key: str) -> tuple[int, bytes, bool, dt.datetime | None] | None:
        """``(seq, value, deleted, stored at)`` of ``key``'s last revision, or None."""
        try:
            reply = await self._nc.request(self._get_subject,
                                           json.dumps({"last_by_subj": self.prefix + key}).encode(),
                                           timeout=self._settings.connect_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            raise translate(exc, f"read {key} in bucket {self.name}") from exc
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == "404":
            return None
        if status:
            raise translate(nats.js.errors.APIError(code=int(status), description=headers.get("Description")),
                            f"read {key} in bucket {self.name}")
        op = headers.get("KV-Operation")
        return int(headers["Nats-Sequence"]), reply.data, op in ("DEL", "PURGE"), stamp(headers.get("Nats-Time-Stamp"))

    async def last(self, key: str) -> tuple[int, bytes, bool] | None:
        entry = await self.entry(key)
        return None if entry is None else entry[:3]

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                      headers: dict[str, str] | None = None) -> int:
        """Put ``value`` at ``key`` (only over revision ``expect`` when given); its KV seq."""
        outcome = (await self.put_many([(key, value, expect, headers)]))[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return int(outcome)

    async def put_many(self, puts: Sequence[Put]) -> list[Any]:
        """Pipelined KV puts ``(key, value, expect, headers)``, sent in order; per put its KV seq,
        :class:`WrongLast`, or the translated error.

        Not ``publish_async``: nats-py 2.16 raises inside its PubAck handler when the reply is an
        error (``APIError.from_error`` raises for 400/404/503), so that future never resolves. The
        replies come back through one subscription of this hub instead.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bytes]] = []
        tokens: list[str] = []
        try:
            for key, value, expect, extra in puts:
                headers = extra if expect is None else {**(extra or {}),
                                                        "Nats-Expected-Last-Subject-Sequence": str(expect)}
                self._count += 1
                token = str(self._count)
                future: asyncio.Future[bytes] = loop.create_future()
                self._waiting[token] = future
                tokens.append(token)
                futures.append(future)
                await self._nc.publish(self.prefix + key, value, reply=f"{self._reply_prefix}.{token}",
                                       headers=headers)
            replies = await asyncio.wait_for(asyncio.gather(*futures), self._settings.publish_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            raise translate(exc, f"write {len(puts)} keys in bucket {self.name}") from exc
        finally:
            for token in tokens:
                self._waiting.pop(token, None)
        results: list[Any] = []
        for reply in replies:
            body: dict[str, Any] = json.loads(reply) if reply else {"error": {"code": 503,
                                                                              "description": "no responders"}}
            error: dict[str, Any] | None = body.get("error")
            if not error:
                results.append(int(body["seq"]))
            elif error.get("err_code") == _WRONG_LAST:
                results.append(WrongLast(error.get("description")))
            else:
                results.append(translate(nats.js.errors.APIError(code=error.get("code"),
                                                                 description=error.get("description")),
                                         f"write in bucket {self.name}"))
        return results

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._reply_prefix) + 1:], None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def _ensure(self) -> None:
        s = self._settings
        try:
            await self._js.stream_info(f"KV_{self.name}")
            return
        except nats.js.errors.NotFoundError:
            pass
        except Exception as exc:
            raise translate(exc, f"look up bucket {self.name}") from exc
        storage = api.StorageType.FILE if s.profile is Profile.DURABLE else api.StorageType.MEMORY
        try:
            await self._js.create_key_value(api.KeyValueConfig(
                bucket=self.name, history=1, storage=storage, replicas=s.replicas, direct=True,
                description="squadbus inbox cursors (c.<agent>), leases (l.<agent>), hubs (h.<hub>)"))
        except Exception as exc:
            with contextlib.suppress(Exception):  # created by another process meanwhile
                await self._js.stream_info(f"KV_{self.name}")
                return
            raise translate(exc, f"create bucket {self.name}") from exc
        logger.info("created KV bucket %s for inbox cursors", self.name)


def stamp(text: str | None) -> dt.datetime | None:
    """A NATS ``Nats-Time-Stamp`` (RFC 3339 with nanoseconds) as a datetime; None if absent or odd."""
    if not text:
        return None
    head, _, rest = text.rstrip("Z").partition(".")
    fraction = "".join(c for c in rest if c.isdigit())[:6]
    try:
        return dt.datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00")
    except ValueError:
        return None
