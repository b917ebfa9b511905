"""Anthropic's Messages API, ``POST /v1/messages``, on the same engine and agent caches.

The agent is named as for chat completions (``X-Agent-ID``, ...) or by
``metadata.user_id``. ``usage.cache_read_input_tokens`` reports the tokens served from the
agent's cache; ``input_tokens`` counts the rest, as Anthropic's API does. Tools take the
generic format of ``api/tools.py``: ``tool_use`` blocks out (streamed as
``input_json_delta``), ``tool_result`` blocks in, ``stop_reason: "tool_use"``.
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

from semantic_server.api import tools as t
from semantic_server.api.errors import stream_error
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import (
    MessagesRequest,
    ToolResultBlock,
    ToolUseBlock,
    plain_text,
)
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
from semantic_server.engine.service import (
    Admitted,
    GenerationParams,
    Outcome,
    Prompt,
    Renderer,
    TokenLogprob,
)
from semantic_server.errors import InvalidRequest

STOP_REASONS = {FinishReason.LENGTH: "max_tokens", FinishReason.STOP: "end_turn"}
CHOICES = {"auto": t.ChoiceMode.AUTO, "any": t.ChoiceMode.REQUIRED,
           "tool": t.ChoiceMode.NAMED, "none": t.ChoiceMode.NONE}


def _stop_reason(outcome: Outcome, called: bool = False) -> str:
    if called and outcome.finish_reason is not FinishReason.LENGTH:
        return "tool_use"
    return "stop_sequence" if outcome.stop_sequence else STOP_REASONS.get(
        outcome.finish_reason, "end_turn")


def _usage(outcome: Outcome) -> dict[str, int]:
    return {"input_tokens": outcome.prompt_tokens - outcome.cached_tokens,
            "output_tokens": outcome.completion_tokens,
            "cache_read_input_tokens": outcome.cached_tokens,
            "cache_creation_input_tokens": 0}


def _turns(chat: MessagesRequest) -> list[t.Turn]:
    """The conversation in the neutral form every tool format renders."""
    names: dict[str, str] = {}  # tool_use id -> tool name
    system = chat.system_text()
    turns = [t.Turn("system", system)] if system else []
    for message in chat.messages:
        if message.role == "assistant":
            uses = message.blocks(ToolUseBlock)
            names.update({use.id: use.name for use in uses})
            turns.append(t.Turn("assistant", message.text(), tuple(
                t.ToolCall(u.id, u.name, u.input) for u in uses)))
            continue
        results = message.blocks(ToolResultBlock)
        for result in results:
            if result.tool_use_id not in names:
                raise InvalidRequest(f"a tool_result answers tool_use_id "
                                     f"{result.tool_use_id!r}, which no assistant turn used",
                                     param="messages")
            content = plain_text(result.content)
            turns.append(t.Turn("tool", f"error: {content}" if result.is_error else content,
                                call_id=result.tool_use_id, name=names[result.tool_use_id]))
        if message.text() or not results:
            turns.append(t.Turn("user", message.text()))
    return turns


def prepare(chat: MessagesRequest) -> Prompt | Renderer:
    """The prompt, or with tools a renderer for the admitted model's tool format."""
    tools = [t.Tool(tool.name, tool.description, tool.input_schema)
             for tool in chat.tools or []]
    spec = chat.tool_choice
    choice = t.ToolChoice(CHOICES[spec.type], spec.name,
                          not spec.disable_parallel_tool_use) if spec else t.ToolChoice()
    if spec is not None and spec.type == "tool" and not spec.name:
        raise InvalidRequest("tool_choice of type tool needs a name", param="tool_choice")
    t.check_tools(tools, choice, "tools")
    turns = _turns(chat)
    if not tools and not any(turn.role == "tool" or turn.calls for turn in turns):
        return [{"role": turn.role, "content": turn.content} for turn in turns]
    if chat.stop_sequences:
        raise InvalidRequest(t.STOP_WITH_TOOLS, param="stop_sequences")
    return t.renderer(turns, tools, choice)


def _content(text: str, fmt: Any) -> list[dict[str, Any]]:
    if fmt is None:
        return [{"type": "text", "text": text}]
    answer = fmt.parse(text, "toolu_")
    if answer.calls:
        return [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in answer.calls]
    return [{"type": "text", "text": answer.text or ""}]


async def messages(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = MessagesRequest.model_validate(body)
    user = chat.metadata.user_id if chat.metadata else None
    agent = agent_id_of(request, {"user": user} if user else {})
    prompt = prepare(chat)
    params = GenerationParams(max_tokens=capped_max_tokens(request, chat.max_tokens),
                              sampling=SamplingParams(chat.temperature, chat.top_p),
                              stop=tuple(chat.stop_sequences or ()),
                              keep_alive=chat.keep_alive)
    items = server.service.generate(agent, prompt, params, chat.model, request_id_of(request),
                                    tenant_of(request))
    message_id = f"msg_{uuid.uuid4().hex}"
    admitted = await wait_admitted(items)
    if not chat.stream:
        done = await collect(items)
        content = _content(done.text, admitted.context)
        called = any(block["type"] == "tool_use" for block in content)
        return JSONResponse({
            "id": message_id, "type": "message", "role": "assistant",
            "model": done.outcome.model_id, "content": content,
            "stop_reason": _stop_reason(done.outcome, called),
            "stop_sequence": done.outcome.stop_sequence, "usage": _usage(done.outcome)})
    return StreamingResponse(_events(items, message_id, admitted),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


class _Blocks:
    """The content blocks of a streamed answer, opened as their first piece arrives."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None  # "text" or "tool_use"
        self.called = False

    def start(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self.stop()
        self.index += 1
        self.open = kind
        self.called = self.called or kind == "tool_use"
        return [*events, _event("content_block_start",
                                {"index": self.index, "content_block": block})]

    def stop(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"index": self.index})]

    def text(self, text: str) -> list[str]:
        events = [] if self.open == "text" else self.start("text", {"type": "text", "text": ""})
        return [*events, _event("content_block_delta", {
            "index": self.index, "delta": {"type": "text_delta", "text": text}})]

    def answer(self, stream: Any, text: str) -> list[str]:
        events: list[str] = []
        for piece in stream.feed(text):
            if isinstance(piece, t.TextDelta):
                events += self.text(piece.text)
            elif isinstance(piece, t.CallStart):
                events += self.start("tool_use", {"type": "tool_use", "id": piece.id,
                                                  "name": piece.name, "input": {}})
            else:
                events.append(_event("content_block_delta", {"index": self.index, "delta": {
                    "type": "input_json_delta", "partial_json": piece.json}}))
        return events


async def _events(items: AsyncIterator[Admitted | str | TokenLogprob | Outcome],
                  message_id: str, admitted: Admitted) -> AsyncIterator[str]:
    yield _event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": admitted.model_id,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0}}})
    blocks = _Blocks()
    answer = admitted.context.stream("toolu_") if admitted.context else None
    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):  # Anthropic's way: an error event ends the stream
                error = stream_error(item, anthropic=True)
                yield f"event: error\ndata: {json.dumps(error)}\n\n"
                return
            if isinstance(item, TokenLogprob):
                continue  # the Messages API has no log-probabilities
            if isinstance(item, str):
                for event in (blocks.answer(answer, item) if answer else blocks.text(item)):
                    yield event
                continue
            for event in blocks.stop():
                yield event
            yield _event("message_delta", {"delta": {
                "stop_reason": _stop_reason(item, blocks.called),
                "stop_sequence": item.stop_sequence}, "usage": _usage(item)})
    yield _event("message_stop", {})


routes = [Route("/v1/messages", messages, methods=["POST"])]
