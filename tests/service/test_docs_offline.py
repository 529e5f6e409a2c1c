"""/docs and /redoc work without internet: every script, style sheet and icon they load is served by us."""

from __future__ import annotations

import re

import pytest

from tests.service.conftest import MakeApp, asgi

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_api_docs_load_only_local_assets(make_app: MakeApp, page: str) -> None:
    async with asgi(make_app()) as api:
        html = (await api.client.get(page)).text
        assets = ASSET.findall(html)
        scripts = [a for a in assets if a.endswith(".js")]
        assert scripts, f"{page} loads no script: {html[:300]}"
        remote = [a for a in assets if a.startswith(("http://", "https://", "//"))]
        assert remote == [], f"{page} loads assets from elsewhere: {remote}"
        for asset in assets:
            response = await api.client.get(asset)
            assert response.status_code == 200, f"{asset}: {response.status_code}"
            assert len(response.content) > 100, asset
        assert (await api.client.get("/openapi.json")).json()["info"]["title"] == "squadbus"
