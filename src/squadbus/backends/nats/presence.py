"""Open inboxes of a NATS squad (``ListsInboxes``), read from the inbox bucket's leases.

An open inbox is served by the one hub holding its lease ``l.<agent>`` in the KV bucket
``<stream>-inboxes`` (:mod:`.inboxes`): the lease's value is the hub's id, put when the hub took
the agent (its time stamp is ``since``) and deleted when it closes. A hub that died leaves its
leases behind until another opener takes them over, so a lease counts only while its hub's
liveness key ``h.<hub>`` (value: the hub's ttl in seconds, renewed every ttl / 3) is present and
younger than ``2 * ttl + 1`` seconds by the server's time stamps (the rule :mod:`.inboxes` uses
across clocks).

Cost: STREAM.INFO of the bucket's stream with a subject filter (``l.>``, then ``h.>``; a request per
100,000 keys), then one batched direct get (``multi_last``) per 1,000 keys: the last revision of every
lease and liveness key, no consumer created.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from squadbus.backends.nats.inbox_bucket import bucket_name, stamp
from squadbus.backends.nats.translate import translate
from squadbus.core.inbox_source import InboxPresence

if TYPE_CHECKING:
    from squadbus.backends.nats.backend import NatsBackend

_BATCH = 1000
"""Subjects per batched direct get (the server answers ``multi_last`` for at most 1,024)."""
_STREAM_NOT_FOUND = 10059
_DEFAULT_TTL = 30.0


async def open_inboxes(backend: NatsBackend) -> list[InboxPresence]:
    """One :class:`InboxPresence` per lease whose hub is alive; raises a BackendError when NATS does not answer."""
    bucket = bucket_name(backend.settings.stream)
    prefix = f"$KV.{bucket}."
    leases: dict[str, tuple[str, dt.datetime | None]] = {}
    hubs: dict[str, tuple[float, dt.datetime | None]] = {}
    for msg in await _last_of_each(backend, bucket, [prefix + "l.>", prefix + "h.>"]):
        headers = msg.headers or {}
        if headers.get("KV-Operation") in ("DEL", "PURGE"):
            continue
        key = headers.get("Nats-Subject", "")[len(prefix):]
        kind, _, name = key.partition(".")
        if kind == "l" and name:
            leases[name] = (msg.data.decode(errors="replace"), stamp(headers.get("Nats-Time-Stamp")))
        elif kind == "h" and name:
            try:
                ttl = float(msg.data)
            except ValueError:
                ttl = _DEFAULT_TTL
            hubs[name] = (ttl, stamp(headers.get("Nats-Time-Stamp")))
    now = dt.datetime.now(dt.UTC)
    out = []
    for agent, (holder, since) in sorted(leases.items()):
        hub = hubs.get(holder)
        if hub is None:
            continue  # its hub closed (or never wrote one): the lease is left from a holder that died
        ttl, renewed = hub
        if renewed is not None and (now - renewed).total_seconds() > 2 * ttl + 1:
            continue  # its hub stopped renewing: died; the next opener takes the lease over
        out.append(InboxPresence(agent_id=agent, holder=holder, since=since))
    return out


async def _last_of_each(backend: NatsBackend, bucket: str, filters: list[str]) -> list[Msg]:
    """The last message of every subject matching ``filters`` in the bucket's stream.

    A direct get of ``multi_last`` answers for at most 1,024 subjects (413 "Too Many Results" beyond, even
    with a small batch), so the subjects are listed first (STREAM.INFO with a subject filter, 100,000 a
    page) and read ``_BATCH`` at a time by name.
    """
    what = f"list the open inboxes in bucket {bucket}"
    try:
        names = [name for f in filters for name in await _subjects(backend, bucket, f)]
        out: list[Msg] = []
        for i in range(0, len(names), _BATCH):
            out += await _multi_last(backend, bucket, names[i:i + _BATCH])
        return out
    except (nats.errors.Error, TimeoutError, KeyError, ValueError) as exc:
        raise translate(exc, what) from exc


async def _subjects(backend: NatsBackend, bucket: str, subject_filter: str) -> list[str]:
    """Every subject of the bucket's stream matching ``subject_filter`` (deleted keys' markers included)."""
    nc, timeout = backend.nc, backend.settings.connect_timeout
    names: list[str] = []
    while True:
        reply = await nc.request(f"$JS.API.STREAM.INFO.KV_{bucket}",
                                 json.dumps({"subjects_filter": subject_filter, "offset": len(names)}).encode(),
                                 timeout=timeout)
        info = json.loads(reply.data)
        error = info.get("error")
        if error:
            if error.get("err_code") == _STREAM_NOT_FOUND:
                return []
            raise nats.js.errors.APIError(code=error.get("code"), description=error.get("description"))
        page = list((info.get("state") or {}).get("subjects") or {})
        names += page
        if not page or len(names) >= int(info.get("total", 0)):
            return names


async def _multi_last(backend: NatsBackend, bucket: str, names: list[str]) -> list[Msg]:
    """The last message of each of ``names`` (at most 1,024) by one batched direct get, paged at the first
    reply's ``up_to_seq`` should the server send fewer."""
    nc, timeout = backend.nc, backend.settings.connect_timeout
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    out: list[Msg] = []
    try:
        request: dict[str, object] = {"multi_last": names, "batch": _BATCH}
        while True:
            await nc.publish(f"$JS.API.DIRECT.GET.KV_{bucket}", json.dumps(request).encode(), reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=timeout)
                headers = msg.headers or {}
                status = headers.get("Status")
                if not status:
                    out.append(msg)
                    continue
                if status == "404":  # none of them has a message (deleted since they were listed)
                    return out
                if status != "204":
                    raise nats.js.errors.APIError(code=int(status), description=headers.get("Description"))
                break
            if int(headers.get("Nats-Num-Pending", "0")) == 0:
                return out
            request = {**request, "up_to_seq": int(headers["Nats-UpTo-Sequence"]),
                       "seq": int(headers["Nats-Last-Sequence"]) + 1}
    finally:
        if not nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
