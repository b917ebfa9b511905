"""Errors to HTTP: one table from error type to status, and OpenAI-style error bodies
(Anthropic-style on the Messages API, whose clients expect ``{"type": "error", ...}``).

Every error raised as an exception gets its status here (a swap's own response maps its
result to a status in admin_routes), and no traceback ever reaches a client: anything not
in the table is logged here and answered as a plain 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from semantic_server import errors as e
from semantic_server.api.request_id import request_id_of

log = logging.getLogger(__name__)

# error type -> (HTTP status, OpenAI error type, default code)
STATUS: dict[type[Exception], tuple[int, str, str]] = {
    e.InvalidRequest: (400, "invalid_request_error", "invalid_request"),
    e.Unauthorized: (401, "authentication_error", "invalid_admin_key"),
    e.InvalidApiKey: (401, "authentication_error", "invalid_api_key"),
    e.AdminDisabled: (403, "permission_error", "admin_disabled"),
    e.HostNotAllowed: (403, "permission_error", "host_not_allowed"),
    e.ModelNotFound: (404, "invalid_request_error", "model_not_found"),
    e.ModelNotLoaded: (409, "invalid_request_error", "model_not_loaded"),
    e.SwapInProgress: (409, "invalid_request_error", "swap_in_progress"),
    e.ModelStateConflict: (409, "invalid_request_error", "model_state_conflict"),
    e.ModelLoadFailed: (503, "server_error", "model_load_failed"),
    e.PayloadTooLarge: (413, "invalid_request_error", "payload_too_large"),
    e.UnsupportedMediaType: (415, "invalid_request_error", "unsupported_media_type"),
    e.ModelInvalid: (422, "invalid_request_error", "model_invalid"),
    e.ModelTooLarge: (422, "invalid_request_error", "model_too_large"),
    e.AdapterNotFound: (404, "invalid_request_error", "adapter_not_found"),
    e.ResponseNotFound: (404, "invalid_request_error", "response_not_found"),
    e.AdapterInvalid: (422, "invalid_request_error", "adapter_invalid"),
    e.AdapterIncompatible: (422, "invalid_request_error", "adapter_incompatible"),
    e.ServerBusy: (503, "server_error", "swap_in_progress"),
    e.AdapterSlotsBusy: (503, "server_error", "adapter_slots_busy"),
    e.AgentBusy: (409, "invalid_request_error", "agent_busy"),
    e.QueueFull: (429, "rate_limit_error", "too_many_requests"),
    e.ServiceDegraded: (503, "server_error", "degraded"),
    e.GenerationFailed: (500, "server_error", "generation_failed"),
}

# HTTP status -> Anthropic error type; other 4xx are invalid_request_error, 5xx api_error
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                   503: "overloaded_error"}
ANTHROPIC_PATHS = ("/v1/messages", "/v1/messages/count_tokens")


def error_response(status: int, message: str, kind: str, code: str,
                   param: str | None = None, headers: dict[str, str] | None = None,
                   ) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def from_exception(exc: Exception) -> JSONResponse:
    for kind in type(exc).__mro__:
        if kind in STATUS:
            status, error_type, code = STATUS[kind]
            param = getattr(exc, "param", None)
            code = getattr(exc, "code", code)
            headers = ({"Retry-After": str(exc.retry_after)}
                       if isinstance(exc, e.Retryable) else None)
            return error_response(status, str(exc), error_type, code, param, headers)
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", "server_error", "internal_error")


def from_validation(exc: ValidationError) -> JSONResponse:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return error_response(400, message, "invalid_request_error", "invalid_request", param)


def anthropic_shaped(response: JSONResponse) -> JSONResponse:
    """The same error in the Messages API's shape, keeping the status and Retry-After."""
    status = response.status_code
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    message = json.loads(response.body)["error"]["message"]
    headers = ({"Retry-After": response.headers["retry-after"]}
               if "retry-after" in response.headers else None)
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}},
                        status_code=status, headers=headers)


def stream_error(exc: Exception, anthropic: bool = False) -> dict[str, Any]:
    """The body of the last event of a stream that a failure ended after it began: the
    same error JSON as a refused request, since the status line is already sent."""
    response = from_exception(exc)
    if anthropic:
        response = anthropic_shaped(response)
    log.warning("stream ended by an error", extra={"fields": {
        "error": type(exc).__name__, "status": response.status_code}})
    return json.loads(response.body)


async def handle_http(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, wrong method) in the caller's API shape."""
    response = error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                              "not_found" if exc.status_code == 404 else "http_error")
    return anthropic_shaped(response) if request.url.path in ANTHROPIC_PATHS else response


def error_for_path(path: str, exc: Exception, request_id: str | None = None) -> JSONResponse:
    """The error response for a request to ``path``, in that API's shape, and its log line."""
    response = from_validation(exc) if isinstance(exc, ValidationError) else from_exception(exc)
    if path in ANTHROPIC_PATHS:
        response = anthropic_shaped(response)
    log.info("request", extra={"fields": {
        "request_id": request_id, "path": path, "status": response.status_code,
        "error": type(exc).__name__,  # our own errors' messages; a body's text never
        **({"message": str(exc)[:200]} if isinstance(exc, e.SemanticServerError) else {})}})
    return response


async def handle_any(request: Request, exc: Exception) -> JSONResponse | None:
    """Starlette exception handler: every error leaves as JSON in the caller's API shape."""
    if isinstance(exc, ClientDisconnect):
        return await handle_disconnect(request, exc)
    return error_for_path(request.url.path, exc, request_id_of(request))


async def handle_disconnect(request: Request, exc: ClientDisconnect) -> None:
    """A client that left while it sent its body: no error of ours, so one line and no
    traceback; and no answer, since nobody is there to read it."""
    log.info("client disconnected while sending its body", extra={"fields": {
        "request_id": request_id_of(request), "path": request.url.path}})
