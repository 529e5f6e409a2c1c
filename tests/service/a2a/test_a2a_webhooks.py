"""The webhook URL policy (SSRF): non-public addresses refused unless allowed, checked again before each POST.

The unit tests resolve literal addresses and ``localhost`` for real. The
delivery tests run the in-process edge (webhooks allowed on 127.0.0.1 only)
and stand in for DNS with :func:`squadbus.service.a2a.webhooks.lookup`, so a
name can resolve to a public address when the config is set and to a private
one when the event is pushed (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ssl
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI, Request, Response

from squadbus.core.errors import ConfigError
from squadbus.core.settings import Settings
from squadbus.service.a2a import webhooks
from squadbus.service.a2a.webhooks import WebhookPolicy, WebhookRefused, post_request
from squadbus.testing.servers.process import free_port
from tests.service.a2a.conftest import InProcess
from tests.service.a2a.test_a2a_push import Hooks, until
from tests.service.conftest import auth, served

REFUSED = [
    ("http://127.0.0.1:8080/x", "loopback"),
    ("http://localhost/x", "loopback"),
    ("http://[::1]/x", "loopback"),
    ("http://[::ffff:127.0.0.1]/x", "loopback"),
    ("http://10.1.2.3/x", "private"),
    ("http://172.16.0.1/x", "private"),
    ("https://192.168.1.1/x", "private"),
    ("http://[fc00::1]/x", "private"),
    ("http://100.64.0.1/x", "not public"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/x", "link-local"),
    ("http://0.0.0.0/x", "unspecified"),
    ("http://224.0.0.1/x", "multicast"),
]


@pytest.mark.parametrize(("url", "kind"), REFUSED)
async def test_non_public_addresses_are_refused_by_default(url: str, kind: str) -> None:
    with pytest.raises(WebhookRefused, match=kind):
        await WebhookPolicy().resolve(url)


async def test_the_allow_list_and_the_pinned_target() -> None:
    for url in ("ftp://8.8.8.8/x", "http:///x", "not a url"):
        with pytest.raises(WebhookRefused, match="http"):
            await WebhookPolicy().resolve(url)
    target = await WebhookPolicy().resolve("https://8.8.8.8:8443/hook?a=1")
    assert (target.pinned_url, target.host_header) == ("https://8.8.8.8:8443/hook?a=1", "8.8.8.8:8443")
    allowed = WebhookPolicy.of(("127.0.0.0/8", "10.1.0.0/16", "fd00::/8", "hooks.internal"))
    assert (await allowed.resolve("http://localhost:9/x")).pinned_url == "http://127.0.0.1:9/x"
    assert (await allowed.resolve("http://10.1.2.3/x")).address == "10.1.2.3"
    assert (await allowed.resolve("http://[fd00::5]:81/x")).pinned_url == "http://[fd00::5]:81/x"
    with pytest.raises(WebhookRefused, match=r"10\.2\.0\.1, a private"):  # only the networks named
        await allowed.resolve("http://10.2.0.1/x")
    with pytest.raises(WebhookRefused, match="link-local"):
        await allowed.resolve("http://169.254.169.254/")
    with pytest.raises(ConfigError, match="neither a CIDR nor a host name"):
        WebhookPolicy.of(("10.0.0.0/33",))
    settings = Settings.from_env({"SQUADBUS_A2A_WEBHOOK_ALLOW": "127.0.0.1, hooks.internal  10.0.0.0/8"})
    assert settings.a2a_webhook_allow == ("127.0.0.1", "hooks.internal", "10.0.0.0/8")
    assert WebhookPolicy.of(settings.a2a_webhook_allow).hosts == {"hooks.internal"}


async def test_a_host_name_allowed_by_name_reaches_its_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    async def lookup(host: str, port: int) -> list[str]:
        return {"hooks.internal": ["10.9.9.9"], "mixed.example": ["8.8.8.8", "10.9.9.9"]}[host]

    monkeypatch.setattr(webhooks, "lookup", lookup)
    target = await WebhookPolicy.of(("hooks.internal",)).resolve("https://hooks.internal/x")
    assert (target.pinned_url, target.host_header, target.host) == ("https://10.9.9.9/x", "hooks.internal",
                                                                     "hooks.internal")
    with pytest.raises(WebhookRefused, match=r"10\.9\.9\.9"):  # every address must pass, not only the first
        await WebhookPolicy().resolve("https://mixed.example/x")


async def _dead_letters(h: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    r = await h.get(url + "/v1/dead-letters", params={"group": "a2a-push"}, headers=auth("admin"))
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def test_delivery_checks_again_and_follows_no_redirect(inproc: InProcess, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    hooks = Hooks()
    answers = iter(["93.184.216.34"])  # public when the config is set, private from then on (TTL 0)

    async def lookup(host: str, port: int) -> list[str]:
        assert host == "hooks.example"
        return [next(answers, "10.0.0.5")]

    monkeypatch.setattr(webhooks, "lookup", lookup)
    async with served(hooks.app()) as hook_url, httpx.AsyncClient(headers=auth("pm"), timeout=30) as h:
        port = hook_url.rsplit(":", 1)[1]
        rest = inproc.url + "/a2a/agents/slow/rest"

        async def open_task(webhook: str) -> str:
            body = {"message": {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": "x"}]},
                    "configuration": {"returnImmediately": True, "taskPushNotificationConfig": {"url": webhook}}}
            r = await h.post(rest + "/message:send", json=body)
            assert r.status_code == 200, r.text
            return str(r.json()["task"]["id"])

        rebound = await open_task(f"http://hooks.example:{port}/flaky")
        redirected = await open_task(f"{hook_url}/redirect")

        async def both_dead() -> bool:
            return len(await _dead_letters(h, inproc.url)) == 2
        await until(both_dead, "both deliveries dead-lettered")
        reasons = {d["message"]["task_execution_id"]: str(d) for d in await _dead_letters(h, inproc.url)}
        assert "refused" in reasons[rebound] and "10.0.0.5, a private address" in reasons[rebound]
        assert "HTTP 307 (redirects are not followed)" in reasons[redirected]
        assert hooks.calls == {"redirect": 3}  # three attempts; the redirect's target never called


def _tls_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for DNS name ``name`` only (no IP address): (ca, cert, key) PEM files."""
    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    now = datetime.now(UTC)
    ca_key, leaf_key = key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "squadbus test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
          .not_valid_after(now + timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return files


async def test_an_https_post_goes_to_the_checked_address_and_verifies_the_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = _tls_files(tmp_path, "hooks.test")
    seen: list[str] = []
    app = FastAPI()

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        seen.append(request.headers["host"])
        return Response(status_code=204)

    async def lookup(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    monkeypatch.setattr(webhooks, "lookup", lookup)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(cert), ssl_keyfile=str(key)))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the https webhook did not start"
            await asyncio.sleep(0.01)
        policy = WebhookPolicy.of(("hooks.test", "other.test"))
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca))) as client:
            target = await policy.resolve(f"https://hooks.test:{port}/hook")
            assert target.pinned_url == f"https://127.0.0.1:{port}/hook"
            response = await client.send(post_request(client, target, b"{}", {}))
            assert response.status_code == 204 and seen == [f"hooks.test:{port}"]
            wrong = await policy.resolve(f"https://other.test:{port}/hook")  # same address, a name the cert lacks
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await client.send(post_request(client, wrong, b"{}", {}))
    finally:
        server.should_exit = True
        await task
