"""Which push-notification webhooks the edge POSTs to (SSRF): public addresses only, unless allowed.

A webhook URL is a request the service makes on a client's behalf, from inside
the network it runs in. So a URL whose host is, or resolves to, a loopback,
private (RFC 1918, fc00::/7, 100.64/10), link-local (169.254/16 with the cloud
metadata address, fe80::/10), unspecified, multicast or reserved address is
refused, unless ``SQUADBUS_A2A_WEBHOOK_ALLOW`` (:attr:`Settings.a2a_webhook_allow
<squadbus.core.settings.Settings.a2a_webhook_allow>`) names the address's network
(a CIDR such as ``10.1.0.0/16`` or ``127.0.0.1``) or the URL's host name.

The check runs twice: when a client sets the config (``InvalidParamsError``
naming the reason) and before every POST, on a fresh resolution of the name
(a name that resolved to a public address when the config was set may
resolve to a private one later: DNS rebinding). Every resolved address must
pass, and the POST then goes to the address that was checked (:class:`Target`),
not to a second resolution; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from squadbus.core.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


async def lookup(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to now (the event loop's resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class WebhookRefused(ValueError):
    """A webhook URL the policy refuses; the message says why."""


def _kind(address: Address) -> str | None:
    """Why ``address`` is not a public unicast destination (None when it is)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return "unspecified"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (cloud metadata lives there)"
    if address.is_multicast:
        return "multicast"
    if address.is_private or not address.is_global:
        return "private" if address.is_private else "not public"
    if address.is_reserved:
        return "reserved"
    return None


@dataclass(frozen=True, slots=True)
class Target:
    """Where a POST goes: the URL as the client gave it and the checked address to connect to."""

    url: str
    host: str
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host name (the port and path kept)."""
        parts = urlsplit(self.url)
        host = f"[{self.address}]" if ":" in self.address else self.address
        netloc = host if parts.port is None else f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        """The ``Host`` header of the POST (the URL's host and port)."""
        return urlsplit(self.url).netloc.rsplit("@", 1)[-1]


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """The allow-list; :meth:`check` and :meth:`resolve` apply it (see the module docstring)."""

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: tuple[str, ...] | list[str]) -> WebhookPolicy:
        """The policy of ``SQUADBUS_A2A_WEBHOOK_ALLOW`` entries: CIDRs or addresses, else host names."""
        networks: list[Network] = []
        hosts: set[str] = set()
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if "/" in entry or not all(label and all(ch.isalnum() or ch == "-" for ch in label)
                                       for label in entry.split(".")):
                raise ConfigError(f"SQUADBUS_A2A_WEBHOOK_ALLOW: {raw!r} is neither a CIDR nor a host name")
            hosts.add(entry)
        return cls(tuple(networks), frozenset(hosts))

    def _allowed(self, address: Address) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)

    async def resolve(self, url: str) -> Target:
        """The checked target of ``url``; :class:`WebhookRefused` when the URL or any resolved address is refused."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise WebhookRefused(f"{url!r} is not a URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookRefused(f"{url!r} is not an http(s) URL with a host")
        host = parts.hostname.lower().rstrip(".")
        try:
            literal: Address | None = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                found = await lookup(host, port)
            except (OSError, UnicodeError) as exc:
                raise WebhookRefused(f"host {host!r} of {url} does not resolve ({exc})") from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in found))
            if not addresses:
                raise WebhookRefused(f"host {host!r} of {url} resolves to no address")
        if host not in self.hosts:
            for address in addresses:
                kind = _kind(address)
                if kind is not None and not self._allowed(address):
                    raise WebhookRefused(
                        f"{url} reaches {address}, a {kind} address; webhooks must be public unless "
                        "SQUADBUS_A2A_WEBHOOK_ALLOW names the network or the host")
        return Target(url=url, host=host, address=str(addresses[0]))


def post_request(client: httpx.AsyncClient, target: Target, body: bytes, headers: Mapping[str, str]) -> httpx.Request:
    """A POST of ``body`` to the checked address of ``target``, its name in ``Host`` and, for https, in SNI and
    the certificate check; https asks for no keep-alive (the client pools connections per address, not name)."""
    out = {**headers, "Host": target.host_header}
    extensions: dict[str, str] = {}
    if urlsplit(target.url).scheme == "https":
        extensions["sni_hostname"] = target.host
        out["Connection"] = "close"
    return client.build_request("POST", target.pinned_url, content=body, headers=out, extensions=extensions)
