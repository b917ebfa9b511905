"""``X-Request-ID``: taken from the request or made up, stored for the logs, and returned.

A plain ASGI middleware (not BaseHTTPMiddleware), so streamed responses pass through
untouched and a client disconnect still reaches the route.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from starlette.requests import Request

# Request ids and agent ids reach logs and metrics: one short, safe alphabet for both.
SAFE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def request_id_of(request: Request) -> str | None:
    """The id the middleware gave this request."""
    return getattr(request.state, "request_id", None)


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if SAFE_ID.fullmatch(given) else f"req-{uuid.uuid4().hex[:16]}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)
