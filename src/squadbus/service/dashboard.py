"""The dashboard at ``/``: overview, executions, one execution (conversation or sequence), agents, dead letters.

A plain static page, no build step and no external asset: ``index.html``,
``dashboard.js`` and ``dashboard.css`` ship as package data under
``static/dashboard/`` and are served from here, with ``/favicon.ico``. The page
reads the API like any client (``/v1/executions``, ``/v1/agents``,
``/v1/dead-letters``, ``/metrics``, ``/readyz``; the SSE streams through
``fetch``, so its bearer token goes in a header, never in a URL) and asks for a
token once per browser tab when the API answers 401. Views and what each reads:
``docs/dashboard.md``.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

ASSETS = "/static/dashboard"
"""Where the page's script and style sheet are served (``index.html`` names them relative to ``/``)."""

MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1f5fbf"/>'
    b'<circle cx="5" cy="8" r="2" fill="#fff"/><circle cx="11" cy="4.5" r="2" fill="#fff"/>'
    b'<circle cx="11" cy="11.5" r="2" fill="#fff"/>'
    b'<path d="M5 8L11 4.5M5 8L11 11.5" stroke="#fff" stroke-width="1"/></svg>'
)
"""An SVG icon (three connected agents); the namespace URI is an identifier, nothing is fetched from it."""

NO_CACHE = {"Cache-Control": "no-cache"}


@cache
def asset(name: str) -> bytes:
    """The bytes of one of the page's files, read once from the package."""
    return resources.files("squadbus.service").joinpath("static", "dashboard", name).read_bytes()


def _file(name: str) -> Response:
    # no-cache: the browser revalidates, so an upgraded squadbus never runs a stale script
    return Response(asset(name), media_type=MEDIA_TYPES[name], headers=NO_CACHE)


@router.get("/")
async def dashboard() -> Response:
    """The dashboard page."""
    return _file("index.html")


@router.get(f"{ASSETS}/dashboard.js")
async def dashboard_js() -> Response:
    """The dashboard's script."""
    return _file("dashboard.js")


@router.get(f"{ASSETS}/dashboard.css")
async def dashboard_css() -> Response:
    """The dashboard's style sheet."""
    return _file("dashboard.css")


@router.get("/favicon.ico")
async def favicon() -> Response:
    """The tab icon (SVG, which browsers accept at this path)."""
    return Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})
