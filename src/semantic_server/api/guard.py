"""Who may talk to the server, checked before any route runs.

- **API keys** (``SEMANTIC_API_KEYS``): when set, every ``/v1`` request must carry one, as
  ``Authorization: Bearer <key>`` (OpenAI's clients) or ``x-api-key`` (Anthropic's). The
  key names the request's *tenant*: agent ids and the anonymous prefix cache are
  namespaced by it, so one client can neither read (through ``cached_tokens``), lock nor
  overwrite another's agent.
- **DNS rebinding**: a server bound to a loopback address answers only requests whose
  ``Host`` is loopback too; a web page whose domain resolves to 127.0.0.1 cannot reach it.
- **Cross-site form posts**: a POST must declare a JSON body; browsers send
  ``application/json`` only after a CORS preflight, which this server never grants.

A plain ASGI middleware, so refusals never reach a route; they are answered in the API's
own error shape.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

from semantic_server.api.errors import error_for_path
from semantic_server.errors import HostNotAllowed, InvalidApiKey, UnsupportedMediaType

LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """Whether a host name or address (``[::1]`` brackets allowed) is this machine's."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tenant_of(key: str) -> str:
    """A short, stable name for an API key (the key itself never leaves this module)."""
    return "t" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):  # [::1]:8000
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class GuardMiddleware:
    def __init__(self, app: Any, api_keys: list[str], bound_host: str) -> None:
        self.app = app
        # Settings refuses blank keys; a blank one that got here anyway matches nothing
        self.api_keys = [key.encode() for key in api_keys if key]
        self.keys_required = bool(api_keys)
        self.loopback_only = is_loopback(bound_host)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            scope.setdefault("state", {})["tenant"] = self._check(scope)
        except (InvalidApiKey, HostNotAllowed, UnsupportedMediaType) as refusal:
            response = error_for_path(scope["path"], refusal,
                                      scope.get("state", {}).get("request_id"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: dict) -> str | None:
        """The request's tenant (None without API keys), or the reason to refuse it."""
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope["headers"]}
        if self.loopback_only and not is_loopback(_host_name(headers.get("host", ""))):
            raise HostNotAllowed("this server answers only requests for a loopback host")
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise UnsupportedMediaType("the body must be JSON (Content-Type: "
                                           "application/json)")
        if not self.keys_required or not scope["path"].startswith("/v1/"):
            return None
        given = headers.get("authorization", "")
        given = given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")
        given = given.strip()
        if not given:  # a missing key is never compared: it matches no key, blank or not
            raise InvalidApiKey("a valid API key is required (Authorization: Bearer <key>)")
        for key in self.api_keys:
            if hmac.compare_digest(given.encode(), key):
                return tenant_of(key.decode())
        raise InvalidApiKey("a valid API key is required (Authorization: Bearer <key>)")
