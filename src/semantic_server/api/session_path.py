"""A session named in the URL: ``/session/<id>/v1/...`` is ``/v1/...`` with
``X-Session-ID: <id>``.

For clients that send no identity and take no custom headers, but whose base URL is a
setting (Qwen Code reads only ``OPENAI_BASE_URL``): ``semantic-server launch qwen`` points it
at ``/session/<id>/v1`` so its conversations keep an agent cache instead of sharing the
anonymous prefix cache. A plain ASGI middleware, outermost, so the guard, the routes and
the logs see the ordinary path; an id outside the agent-id alphabet is left unrewritten
(a 404, as for any unknown path).
"""

from __future__ import annotations

from typing import Any

from semantic_server.api.request_id import SAFE_ID

PREFIX = "/session/"


class SessionPathMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith(PREFIX):
            session, _, rest = path[len(PREFIX):].partition("/")
            if SAFE_ID.fullmatch(session) and rest.startswith("v1/"):
                headers = [(k, v) for k, v in scope["headers"] if k != b"x-session-id"]
                scope = {**scope, "path": "/" + rest, "raw_path": ("/" + rest).encode(),
                         "headers": [*headers, (b"x-session-id", session.encode())]}
        await self.app(scope, receive, send)
