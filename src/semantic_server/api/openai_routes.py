"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api.errors import stream_error
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import ChatCompletionRequest
from semantic_server.api.turn import (
    agent_id_of,
    capped_max_tokens,
    collect,
    read_json,
    relay,
    tenant_of,
    wait_admitted,
)
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import Admitted, GenerationParams, Outcome


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
    params = GenerationParams(
        max_tokens=capped_max_tokens(request, chat.requested_max_tokens()),
        sampling=SamplingParams(chat.temperature, chat.top_p, chat.seed),
        stop=chat.stop_strings(),
    )
    messages = [m.as_template_message() for m in chat.messages]
    items = server.service.generate(agent, messages, params, chat.model, request_id_of(request),
                                    tenant_of(request))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    admitted = await wait_admitted(items)
    if not chat.stream:
        text, item = await collect(items)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": item.model_id,
            "choices": [{"index": 0, "finish_reason": item.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": _usage(item),
        })
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return StreamingResponse(
        _sse(items, completion_id, created, admitted.model_id, include_usage),
        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _sse(items: AsyncIterator[Admitted | str | Outcome], completion_id: str,
               created: int, model_id: str, include_usage: bool) -> AsyncIterator[str]:
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
    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):  # OpenAI's way: an error object, and no [DONE]
                yield f"data: {json.dumps(stream_error(item))}\n\n"
                return
            if isinstance(item, str):
                yield chunk({"content": item})
                continue
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
