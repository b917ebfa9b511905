"""Anthropic's Messages API, ``POST /v1/messages`` (and ``/v1/messages/count_tokens``), on
the same engine and agent caches, as Claude Code sends it.

The agent is named as for chat completions (``X-Agent-ID``, ...), by Claude Code's
``X-Claude-Code-Session-Id`` or by the session in ``metadata.user_id`` (``api/identity.py``).
``usage.cache_read_input_tokens`` reports the tokens served from the agent's cache; the
server keeps every prompt it serves in the agent's cache, so when the request marks
``cache_control`` breakpoints the rest of the prompt is reported as
``cache_creation_input_tokens``, else as ``input_tokens``. Tools take the format of
``api/tools.py``: ``tool_use`` blocks out (streamed as ``input_json_delta``), ``tool_result``
blocks in, ``stop_reason: "tool_use"``. Server tools and ``defer_loading`` tools cannot run
here: they are withheld from the model and named in the ``X-Tools-Withheld`` header.
``system`` turns inside ``messages`` are rendered where they stand; ``thinking``,
``output_config`` and ``context_management`` are README's "Claude Code" section.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api import tools as t
from semantic_server.api.context_edits import Applied, with_edits
from semantic_server.api.errors import stream_error
from semantic_server.api.identity import agent_id_of, family, tenant_of
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import (
    AnthropicTool,
    CountTokensRequest,
    MessagesRequest,
    ToolResultBlock,
    ToolUseBlock,
    plain_text,
)
from semantic_server.api.turn import (
    capped_max_tokens,
    collect,
    read_json,
    relay,
    schema_grammar,
    wait_admitted,
    withheld_header,
)
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import (
    Admitted,
    GenerationParams,
    Grammar,
    Rendered,
    Renderer,
    TokenLogprob,
)
from semantic_server.errors import InvalidRequest
from semantic_server.request_outcome import FinishReason, Outcome

STOP_REASONS = {FinishReason.LENGTH: "max_tokens", FinishReason.STOP: "end_turn"}
CHOICES = {"auto": t.ChoiceMode.AUTO, "any": t.ChoiceMode.REQUIRED,
           "tool": t.ChoiceMode.NAMED, "none": t.ChoiceMode.NONE}


def _stop_reason(outcome: Outcome, called: bool = False) -> str:
    if called and outcome.finish_reason is not FinishReason.LENGTH:
        return "tool_use"
    return "stop_sequence" if outcome.stop_sequence else STOP_REASONS.get(
        outcome.finish_reason, "end_turn")


def _usage(prompt: int, cached: int, output: int, breakpoints: bool) -> dict[str, int]:
    """Anthropic's usage: what the cache served, and the rest as written to the cache
    (with breakpoints) or as plain input."""
    rest = prompt - cached
    return {"input_tokens": 0 if breakpoints else rest, "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": rest if breakpoints else 0}


def _final_usage(outcome: Outcome, breakpoints: bool) -> dict[str, int]:
    return _usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens,
                  breakpoints)


def has_breakpoints(body: dict[str, Any]) -> bool:
    """Whether the request marks any ``cache_control`` breakpoint (system blocks, message
    blocks or tools)."""
    def marked(items: Any) -> bool:
        return isinstance(items, list) and any(
            isinstance(item, dict) and item.get("cache_control") for item in items)

    messages = body.get("messages")
    return (marked(body.get("system")) or marked(body.get("tools"))
            or (isinstance(messages, list) and any(
                isinstance(m, dict) and marked(m.get("content")) for m in messages)))


def _turns(chat: MessagesRequest) -> list[t.Turn]:
    """The conversation in the neutral form every tool format renders."""
    names: dict[str, str] = {}  # tool_use id -> tool name
    system = chat.system_text()
    turns = [t.Turn("system", system)] if system else []
    for message in chat.messages:
        if message.role == "system":
            turns.append(t.Turn("system", message.text()))
            continue
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


@dataclass
class Prepared:
    """A Messages request made ready for the engine: how to render its prompt, the tools
    withheld from the model, and the context edits its rendering applied."""

    render: Renderer
    withheld: list[str] = field(default_factory=list)
    applied: Applied = field(default_factory=Applied)


def _tools(declared: list[AnthropicTool]) -> tuple[list[t.Tool], list[str]]:
    """The tools the model is offered, and the names of those withheld."""
    offered = [t.Tool(tool.name, tool.description, tool.input_schema)
               for tool in declared if tool.runs_here()]
    return offered, [tool.name for tool in declared if not tool.runs_here()]


def _format_grammar(chat: MessagesRequest) -> Grammar | None:
    spec = chat.output_config.format if chat.output_config else None
    return None if spec is None else schema_grammar(spec.schema_,
                                                    "output_config.format.schema")


def prepare(chat: MessagesRequest) -> Prepared:
    """The request's renderer (the admitted model's tool format, when tools are on)."""
    tools, withheld = _tools(chat.tools or [])
    spec = chat.tool_choice
    choice = t.ToolChoice(CHOICES[spec.type], spec.name,
                          not spec.disable_parallel_tool_use) if spec else t.ToolChoice()
    if spec is not None and spec.type == "tool" and not spec.name:
        raise InvalidRequest("tool_choice of type tool needs a name", param="tool_choice")
    t.check_tools(tools, choice, "tools")
    turns = _turns(chat)
    grammar = _format_grammar(chat)
    tools_on = bool(tools) or any(turn.role == "tool" or turn.calls for turn in turns)
    if tools_on and grammar is not None:
        raise InvalidRequest("output_config.format cannot be combined with tools here; ask "
                             "for a tool whose input_schema is the schema",
                             param="output_config.format")
    if tools_on and chat.stop_sequences:
        raise InvalidRequest(t.STOP_WITH_TOOLS, param="stop_sequences")

    def make(edited: list[t.Turn]) -> Renderer:
        if tools_on:
            return t.renderer(edited, tools, choice)
        messages = [{"role": turn.role, "content": turn.content} for turn in edited]
        return lambda tokenizer: Rendered(messages, grammar=grammar)

    edits = chat.context_management.edits if chat.context_management else []
    applied = Applied()
    return Prepared(with_edits(turns, make, edits, applied), withheld, applied)


def _content(text: str, fmt: Any) -> list[dict[str, Any]]:
    if fmt is None:
        return [{"type": "text", "text": text}]
    answer = fmt.parse(text, "toolu_")
    if answer.calls:
        return [{"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}
                for c in answer.calls]
    return [{"type": "text", "text": answer.text or ""}]


def model_of(server: Any, chat: MessagesRequest) -> str | None:
    """The model a Messages request runs on: the one it names, except that a name of
    Anthropic's own models (``claude-*``) that no resident model has means the serving
    model. Claude Code names those for some side requests whatever its settings say."""
    named = chat.model
    if named is None or not named.startswith("claude-"):
        return named
    return named if server.versions.resident(named) is not None else None


def _agent(request: Request, body: dict[str, Any], chat: MessagesRequest) -> str | None:
    user = chat.metadata.user_id if chat.metadata else None
    return agent_id_of(request, body, user_id=user, family_of=family(
        chat.system_text(), (tool.name for tool in chat.tools or [])))


async def messages(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = MessagesRequest.model_validate(body)
    agent = _agent(request, body, chat)
    prepared = prepare(chat)
    breakpoints = has_breakpoints(body)
    params = GenerationParams(max_tokens=capped_max_tokens(request, chat.max_tokens),
                              sampling=SamplingParams(chat.temperature, chat.top_p),
                              stop=tuple(chat.stop_sequences or ()),
                              keep_alive=chat.keep_alive)
    items = server.service.generate(agent, prepared.render, params, model_of(server, chat),
                                    request_id_of(request), tenant_of(request))
    message_id = f"msg_{uuid.uuid4().hex}"
    admitted = await wait_admitted(items)
    headers = withheld_header(prepared.withheld)
    if not chat.stream:
        done = await collect(items)
        content = _content(done.text, admitted.context)
        called = any(block["type"] == "tool_use" for block in content)
        reply = {
            "id": message_id, "type": "message", "role": "assistant",
            "model": done.outcome.model_id, "content": content,
            "stop_reason": _stop_reason(done.outcome, called),
            "stop_sequence": done.outcome.stop_sequence,
            "usage": _final_usage(done.outcome, breakpoints)}
        if chat.context_management is not None:
            reply["context_management"] = {"applied_edits": prepared.applied.edits}
        return JSONResponse(reply, headers=headers)
    applied = prepared.applied if chat.context_management is not None else None
    return StreamingResponse(_events(items, message_id, admitted, breakpoints, applied),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


async def count_tokens(request: Request) -> Response:
    """Anthropic's token count: the prompt as the serving (or named) model would see it."""
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = CountTokensRequest.model_validate(body)
    prepared = prepare(chat)
    tokens = await server.service.count_tokens(prepared.render, model_of(server, chat))
    return JSONResponse({"input_tokens": tokens}, headers=withheld_header(prepared.withheld))


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
                  message_id: str, admitted: Admitted, breakpoints: bool,
                  applied: Applied | None = None) -> AsyncIterator[str]:
    yield _event("message_start", {"message": {
        "id": message_id, "type": "message", "role": "assistant", "model": admitted.model_id,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": _usage(admitted.prompt_tokens, admitted.cached_tokens, 0, breakpoints)}})
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
            if blocks.index < 0:  # an empty answer (or a call cut short): one empty text
                for event in blocks.start("text", {"type": "text", "text": ""}):  # block,
                    yield event  # as in the reply not streamed
            for event in blocks.stop():
                yield event
            yield _event("message_delta", {"delta": {
                "stop_reason": _stop_reason(item, blocks.called),
                "stop_sequence": item.stop_sequence}, "usage": _final_usage(item, breakpoints),
                **({"context_management": {"applied_edits": applied.edits}}
                   if applied is not None else {})})
    yield _event("message_stop", {})


routes = [Route("/v1/messages", messages, methods=["POST"]),
          Route("/v1/messages/count_tokens", count_tokens, methods=["POST"])]
