"""What the OpenAPI document says beyond the route declarations.

Both SSE routes read ``Last-Event-ID`` with :func:`.routes_sse.resume_cursor`
(ASCII digits, at most 2^62, surrounding blanks ignored, blank = none); the
header is declared as a plain string there, so the rule is added to the
document here, in one place for both routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from squadbus.service.routes_sse import MAX_EVENT_ID

EVENT_ID_PATTERN = r"^\s*[0-9]{0,19}\s*$"
EVENT_ID_SCHEMA: dict[str, Any] = {
    "type": "string", "pattern": EVENT_ID_PATTERN, "maxLength": 40,
    "description": f"The id of the last event received: ASCII digits, at most {MAX_EVENT_ID} (blank: none). "
                   "Wins over ?after=; anything else is a 422.",
}


def add_event_id_rule(schema: dict[str, Any]) -> None:
    """Give every ``Last-Event-ID`` header parameter of ``schema`` the format the server enforces."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for param in operation.get("parameters", ()):
                if param.get("in") == "header" and param.get("name") == "Last-Event-ID":
                    param["schema"] = dict(EVENT_ID_SCHEMA)
                    param["description"] = EVENT_ID_SCHEMA["description"]


def describe(app: FastAPI) -> None:
    """Make ``app.openapi()`` include the rules above (FastAPI builds and caches the document once)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        add_event_id_rule(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
