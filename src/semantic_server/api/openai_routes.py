"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api.schemas import ChatCompletionRequest
from semantic_server.engine.batch_engine import SamplingParams
from semantic_server.engine.service import GenerationParams, Outcome
from semantic_server.errors import InvalidRequest, ModelNotFound, ModelNotLoaded, PayloadTooLarge
from semantic_server.observability import hash_agent

log = logging.getLogger(__name__)

AGENT_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def agent_id_of(request: Request, body: dict[str, Any]) -> str | None:
    """Agent identity: X-Agent-ID, X-Session-ID, body session_id, body user; else anonymous."""
    candidates = (request.headers.get("x-agent-id"), request.headers.get("x-session-id"),
                  body.get("session_id"), body.get("user"))
    agent = next((c for c in candidates if c is not None), None)
    if agent is None:
        return None
    if not isinstance(agent, str) or not AGENT_ID.fullmatch(agent):
        raise InvalidRequest("an agent id is 1-128 characters of A-Z a-z 0-9 . _ : @ -",
                             param="agent_id", code="invalid_agent_id")
    return agent


def check_model(request: Request, requested: str | None) -> None:
    server = request.app.state.server
    loaded = server.engine.loaded
    if requested is None or (loaded is not None and requested == loaded.model_id):
        return
    if any(entry.model_id == requested for entry in server.catalog.available()):
        raise ModelNotLoaded(f"model {requested!r} is available but not loaded (loaded: "
                             f"{loaded.model_id if loaded else 'none'}); swap to it first")
    raise ModelNotFound(f"model {requested!r} does not exist")


def record(request: Request, agent: str | None, outcome: Outcome) -> None:
    """Metrics and one structured log line for a finished request."""
    seconds = time.perf_counter() - outcome.started
    request.app.state.server.metrics.observe_request(
        outcome.model_id, outcome.prompt_tokens, outcome.cached_tokens,
        outcome.completion_tokens, outcome.ttft_seconds, seconds)
    log.info("request", extra={"fields": {
        "request_id": getattr(request.state, "request_id", None), "agent": hash_agent(agent),
        "model": outcome.model_id, "prompt_tokens": outcome.prompt_tokens,
        "cached_tokens": outcome.cached_tokens, "generated_tokens": outcome.completion_tokens,
        "ttft_s": round(outcome.ttft_seconds, 4) if outcome.ttft_seconds else None,
        "seconds": round(seconds, 4), "finish_reason": outcome.finish_reason, "status": 200}})


async def collect(first: str | Outcome, items: AsyncIterator[str | Outcome],
                  ) -> tuple[str, Outcome]:
    """The whole text and the outcome of a non-streamed request."""
    text, item = [], first
    try:
        while not isinstance(item, Outcome):
            text.append(item)
            item = await anext(items)
    finally:
        await items.aclose()
    return "".join(text), item


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


async def chat_completions(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = ChatCompletionRequest.model_validate(body)
    agent = agent_id_of(request, body)
    check_model(request, chat.model)
    max_tokens = chat.requested_max_tokens() or server.settings.default_max_tokens
    if max_tokens > server.settings.max_tokens_limit:
        raise InvalidRequest(f"max_tokens is limited to {server.settings.max_tokens_limit}",
                             param="max_tokens")
    params = GenerationParams(
        max_tokens=max_tokens,
        sampling=SamplingParams(chat.temperature, chat.top_p, chat.seed),
        stop=chat.stop_strings(),
    )
    messages = [m.as_template_message() for m in chat.messages]
    items = server.service.generate(agent, messages, params)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    # Pull the first item before answering, so that refusals (busy, too long) keep their
    # HTTP status even for streams.
    first = await anext(items)
    if not chat.stream:
        text, item = await collect(first, items)
        record(request, agent, item)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": item.model_id,
            "choices": [{"index": 0, "finish_reason": item.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": _usage(item),
        })
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    model_id = server.engine.loaded.model_id
    return StreamingResponse(
        _sse(first, items, completion_id, created, model_id, include_usage,
             lambda outcome: record(request, agent, outcome)),
        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(first: str | Outcome, items: AsyncIterator[str | Outcome], completion_id: str,
               created: int, model_id: str, include_usage: bool,
               on_end: Callable[[Outcome], None]) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None,
              usage: dict[str, Any] | None = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model_id,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                          "logprobs": None}],
        }
        if usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    item = first
    try:
        while not isinstance(item, Outcome):
            yield chunk({"content": item})
            item = await anext(items)
    finally:
        await items.aclose()
    on_end(item)
    yield chunk({}, item.finish_reason)
    if include_usage:
        yield chunk({}, usage=_usage(item))
    yield "data: [DONE]\n\n"


async def list_models(request: Request) -> JSONResponse:
    server = request.app.state.server
    return JSONResponse({"object": "list", "data": [
        {"id": entry.model_id, "object": "model", "created": 0, "owned_by": "semantic-server"}
        for entry in server.catalog.available()]})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
