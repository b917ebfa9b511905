"""OpenAI's legacy ``POST /v1/completions``: continue a prompt (text or token ids), for base
models such as Gemma 3 270M, on the same engine and with the same agent caches when an
agent is named."""

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
from semantic_server.api.identity import agent_id_of, tenant_of
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import CompletionRequest
from semantic_server.api.turn import (
    capped_max_tokens,
    collect,
    openai_usage,
    read_json,
    relay,
    wait_admitted,
)
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import Admitted, GenerationParams, TokenLogprob
from semantic_server.request_outcome import Outcome


def legacy_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """Log-probabilities in the completions API's shape (``text_offset`` from ``offset``)."""
    offsets = []
    for item in items:
        offsets.append(offset)
        offset += len(item.token)
    return {"tokens": [i.token for i in items], "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [dict(i.top) for i in items], "text_offset": offsets}


async def completions(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    completion = CompletionRequest.model_validate(body)
    agent = agent_id_of(request, body)
    params = GenerationParams(
        max_tokens=capped_max_tokens(request, completion.max_tokens or 16),
        sampling=SamplingParams(completion.temperature, completion.top_p, completion.seed),
        stop=completion.stop_strings(), logprobs=completion.logprobs,
        keep_alive=completion.keep_alive)
    items = server.service.generate(agent, completion.prompt, params, completion.model,
                                    request_id_of(request), tenant_of(request))
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    admitted = await wait_admitted(items)
    wants_logprobs = completion.logprobs is not None
    if not completion.stream:
        done = await collect(items)
        return JSONResponse({
            "id": completion_id, "object": "text_completion", "created": created,
            "model": done.outcome.model_id,
            "choices": [{"index": 0, "text": done.text, "finish_reason":
                         done.outcome.finish_reason,
                         "logprobs": legacy_logprobs(done.logprobs, 0) if wants_logprobs
                         else None}],
            "usage": openai_usage(done.outcome)})
    include_usage = completion.include_usage()
    return StreamingResponse(
        _stream(items, completion_id, created, admitted, include_usage, wants_logprobs),
        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(items: AsyncIterator[Admitted | str | TokenLogprob | Outcome],
                  completion_id: str, created: int, admitted: Admitted, include_usage: bool,
                  wants_logprobs: bool) -> AsyncIterator[str]:
    pending: list[TokenLogprob] = []
    sent = 0  # characters of text sent, for text_offset

    def chunk(text: str, finish: str | None = None,
              usage: dict[str, Any] | None = None) -> str:
        logprobs = legacy_logprobs(pending, sent) if wants_logprobs and pending else None
        pending.clear()
        data: dict[str, Any] = {
            "id": completion_id, "object": "text_completion", "created": created,
            "model": admitted.model_id,
            "choices": [] if usage else [{"index": 0, "text": text, "finish_reason": finish,
                                          "logprobs": logprobs}]}
        if usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):
                yield f"data: {json.dumps(stream_error(item))}\n\n"
                return
            if isinstance(item, TokenLogprob):
                pending.append(item)
            elif isinstance(item, str):
                yield chunk(item)
                sent += len(item)
            else:
                yield chunk("", item.finish_reason)
                if include_usage:
                    yield chunk("", usage=openai_usage(item))
    yield "data: [DONE]\n\n"


routes = [Route("/v1/completions", completions, methods=["POST"])]
