"""Anthropic's Messages API, ``POST /v1/messages``, on the same engine and agent caches.

The agent is named as for chat completions (``X-Agent-ID``, ...) or by
``metadata.user_id``. ``usage.cache_read_input_tokens`` reports the tokens served from the
agent's cache; ``input_tokens`` counts the rest, as Anthropic's API does.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api.errors import stream_error
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import MessagesRequest
from semantic_server.api.turn import (
    agent_id_of,
    capped_max_tokens,
    collect,
    read_json,
    relay,
    tenant_of,
    wait_admitted,
)
from semantic_server.engine.jobs import FinishReason, SamplingParams
from semantic_server.engine.service import Admitted, GenerationParams, Outcome

STOP_REASONS = {FinishReason.LENGTH: "max_tokens", FinishReason.STOP: "end_turn"}


def _stop_reason(outcome: Outcome) -> str:
    return "stop_sequence" if outcome.stop_sequence else STOP_REASONS.get(
        outcome.finish_reason, "end_turn")


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"input_tokens": outcome.prompt_tokens - outcome.cached_tokens,
            "output_tokens": outcome.completion_tokens,
            "cache_read_input_tokens": outcome.cached_tokens,
            "cache_creation_input_tokens": 0}


async def messages(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = MessagesRequest.model_validate(body)
    user = chat.metadata.user_id if chat.metadata else None
    agent = agent_id_of(request, {"user": user} if user else {})
    params = GenerationParams(max_tokens=capped_max_tokens(request, chat.max_tokens),
                              sampling=SamplingParams(chat.temperature, chat.top_p),
                              stop=tuple(chat.stop_sequences or ()))
    items = server.service.generate(agent, chat.template_messages(), params, chat.model,
                                    request_id_of(request), tenant_of(request))
    message_id = f"msg_{uuid.uuid4().hex}"
    admitted = await wait_admitted(items)
    if not chat.stream:
        text, item = await collect(items)
        return JSONResponse({
            "id": message_id, "type": "message", "role": "assistant", "model": item.model_id,
            "content": [{"type": "text", "text": text}],
            "stop_reason": _stop_reason(item), "stop_sequence": item.stop_sequence,
            "usage": _usage(item)})
    return StreamingResponse(
        _events(items, message_id, admitted.model_id),
        media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _events(items: AsyncIterator[Admitted | str | Outcome], message_id: str,
                  model_id: str) -> AsyncIterator[str]:
    def event(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

    yield event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": model_id,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0}}})
    yield event("content_block_start", {"index": 0,
                                        "content_block": {"type": "text", "text": ""}})
    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):  # Anthropic's way: an error event ends the stream
                error = stream_error(item, anthropic=True)
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            if isinstance(item, str):
                yield event("content_block_delta", {
                    "index": 0, "delta": {"type": "text_delta", "text": item}})
                continue
            yield event("content_block_stop", {"index": 0})
            yield event("message_delta", {"delta": {"stop_reason": _stop_reason(item),
                                                    "stop_sequence": item.stop_sequence},
                                          "usage": _usage(item)})
    yield event("message_stop", {})


routes = [Route("/v1/messages", messages, methods=["POST"])]
