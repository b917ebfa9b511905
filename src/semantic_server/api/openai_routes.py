"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

Chat completions take tools (the generic format of ``api/tools.py``), ``response_format``
(``json_object`` or ``json_schema``, always enforced by a grammar) and ``logprobs``; what
cannot be honoured is a 400, never ignored.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api import tools as t
from semantic_server.api.errors import stream_error
from semantic_server.api.identity import agent_id_of, family, tenant_of
from semantic_server.api.request_id import request_id_of
from semantic_server.api.schemas import ChatCompletionRequest, ChatMessage
from semantic_server.api.tool_types import history_arguments
from semantic_server.api.turn import (
    ANY_OBJECT,
    capped_max_tokens,
    collect,
    openai_usage,
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
    Prompt,
    Renderer,
    TokenLogprob,
)
from semantic_server.errors import InvalidRequest, SemanticServerError
from semantic_server.request_outcome import FinishReason, Outcome


def logprob_entry(item: TokenLogprob) -> dict[str, Any]:
    """One token in OpenAI's chat ``logprobs.content`` shape."""
    def token(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {**token(item.token, item.logprob),
            "top_logprobs": [token(text, logprob) for text, logprob in item.top]}


def _choice(chat: ChatCompletionRequest) -> t.ToolChoice:
    choice = chat.tool_choice
    if choice is None:
        mode = t.ChoiceMode.AUTO
    elif isinstance(choice, str):
        mode = t.ChoiceMode(choice)
    else:
        return t.ToolChoice(t.ChoiceMode.NAMED, choice.function.name, chat.parallel_tool_calls)
    return t.ToolChoice(mode, None, chat.parallel_tool_calls)


def _turns(messages: list[ChatMessage]) -> list[t.Turn]:
    """The conversation in the neutral form every tool format renders."""
    names: dict[str, str] = {}  # tool call id -> function name
    turns = []
    for message in messages:
        if message.role == "tool":
            name = names.get(message.tool_call_id or "")
            if name is None:
                raise InvalidRequest(f"a tool message answers tool_call_id "
                                     f"{message.tool_call_id!r}, which no assistant message "
                                     "called", param="messages")
            turns.append(t.Turn("tool", message.text(), call_id=message.tool_call_id,
                                name=name))
        elif message.role == "assistant" and message.tool_calls:
            calls = tuple(t.ToolCall(c.id, c.function.name,
                                     history_arguments(c.function.arguments))
                          for c in message.tool_calls)
            names.update({call.id: call.name for call in calls})
            turns.append(t.Turn("assistant", message.text(), calls))
        else:
            template = message.as_template_message()
            turns.append(t.Turn(template["role"], template["content"]))
    return turns


def prepare(chat: ChatCompletionRequest,
            ) -> tuple[Prompt | Renderer, Grammar | None, list[str]]:
    """The prompt (or, with tools, a renderer for the admitted model's tool format, which
    makes the grammar too), the grammar of the answer, and the tools withheld."""
    declared = chat.tools or []
    tools = [t.Tool(d.function.name, d.function.description,
                    d.function.parameters or {"type": "object"})
             for d in declared if d.type == "function" and d.function is not None]
    withheld = [d.label() for d in declared if d.type != "function"]
    choice = _choice(chat)
    t.check_tools(tools, choice, "tools")
    turns = _turns(chat.messages)
    tools_on = bool(tools) or any(turn.role == "tool" or turn.calls for turn in turns)
    wants_json = chat.response_format is not None and chat.response_format.type != "text"
    if tools_on and wants_json:
        raise InvalidRequest("response_format cannot be combined with tools here; ask for "
                             "a tool whose parameters are the schema", param="response_format")
    if tools_on and chat.stop:
        raise InvalidRequest(t.STOP_WITH_TOOLS, param="stop")
    if tools_on:
        return t.renderer(turns, tools, choice), None, withheld
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    if not wants_json:
        return messages, None, withheld
    if chat.response_format.type == "json_object":
        return messages, schema_grammar(ANY_OBJECT, "response_format"), withheld
    spec = chat.response_format.json_schema
    if spec is None or not spec.schema_:
        raise InvalidRequest("response_format json_schema needs json_schema.schema",
                             param="response_format.json_schema")
    return (messages, schema_grammar(spec.schema_, "response_format.json_schema.schema"),
            withheld)


def _message(text: str, outcome: Outcome, fmt: Any) -> tuple[dict[str, Any], str]:
    """The assistant message and finish reason of a whole answer (``fmt``: the tool format
    that reads it, None without tools)."""
    if fmt is None:
        return {"role": "assistant", "content": text}, outcome.finish_reason
    answer = fmt.parse(text, "call_")
    if answer.calls:  # the calls that closed, even when max_tokens cut a later one
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": t.compact(c.arguments)}}
            for c in answer.calls]}, "tool_calls" if answer.complete else outcome.finish_reason
    return {"role": "assistant", "content": answer.text}, outcome.finish_reason


async def chat_completions(request: Request) -> Response:
    server = request.app.state.server
    body = await read_json(request, server.settings.max_body_bytes)
    chat = ChatCompletionRequest.model_validate(body)
    system = next((m.text() for m in chat.messages if m.role in ("system", "developer")), "")
    agent = agent_id_of(request, body, family_of=family(
        system, (d.label() for d in chat.tools or [])))
    prompt, grammar, withheld = prepare(chat)
    params = GenerationParams(
        max_tokens=capped_max_tokens(request, chat.requested_max_tokens()),
        sampling=SamplingParams(chat.temperature, chat.top_p, chat.seed),
        stop=chat.stop_strings(), grammar=grammar, logprobs=chat.requested_logprobs(),
        keep_alive=chat.keep_alive)
    items = server.service.generate(agent, prompt, params, chat.model, request_id_of(request),
                                    tenant_of(request))
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    admitted = await wait_admitted(items)
    if not chat.stream:
        done = await collect(items)
        message, finish = _message(done.text, done.outcome, admitted.context)
        logprobs = ({"content": [logprob_entry(i) for i in done.logprobs]}
                    if chat.logprobs else None)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created,
            "model": done.outcome.model_id,
            "choices": [{"index": 0, "finish_reason": finish, "logprobs": logprobs,
                         "message": message}],
            "usage": openai_usage(done.outcome),
        }, headers=withheld_header(withheld))
    include_usage = chat.include_usage()
    return StreamingResponse(
        _sse(items, completion_id, created, admitted, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", **withheld_header(withheld)})


async def _sse(items: AsyncIterator[Admitted | str | TokenLogprob | Outcome],
               completion_id: str, created: int, admitted: Admitted, include_usage: bool,
               ) -> AsyncIterator[str]:
    pending: list[TokenLogprob] = []  # log-probabilities ride on the next chunk

    def chunk(delta: dict[str, Any], finish: str | None = None,
              usage: dict[str, Any] | None = None) -> str:
        logprobs = {"content": [logprob_entry(i) for i in pending]} if pending else None
        pending.clear()
        data: dict[str, Any] = {
            "id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": admitted.model_id,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish,
                                          "logprobs": logprobs}],
        }
        if usage:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    answer = admitted.context.stream("call_") if admitted.context else None
    called = False
    yield chunk({"role": "assistant", "content": ""})
    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):  # OpenAI's way: an error object, and no [DONE]
                yield f"data: {json.dumps(stream_error(item))}\n\n"
                return
            if isinstance(item, TokenLogprob):
                pending.append(item)
                continue
            if isinstance(item, str):
                for delta in _deltas(answer, item):
                    called = called or "tool_calls" in delta
                    yield chunk(delta)
                continue
            finish = ("tool_calls" if called and item.finish_reason is not FinishReason.LENGTH
                      else item.finish_reason)
            yield chunk({}, finish)
            if include_usage:
                yield chunk({}, usage=openai_usage(item))
    yield "data: [DONE]\n\n"


def _deltas(answer: Any, text: str) -> list[dict[str, Any]]:
    """The chunks' deltas for a piece of the answer: its text, or tool-call pieces."""
    if answer is None:
        return [{"content": text}]
    deltas = []
    for event in answer.feed(text):
        if isinstance(event, t.TextDelta):
            deltas.append({"content": event.text})
        elif isinstance(event, t.CallStart):
            deltas.append({"tool_calls": [{"index": event.index, "id": event.id,
                                           "type": "function", "function": {
                                               "name": event.name, "arguments": ""}}]})
        else:
            deltas.append({"tool_calls": [{"index": event.index,
                                           "function": {"arguments": event.json}}]})
    return deltas


def model_ids(server: Any) -> list[tuple[str, int | None]]:
    """Every model a request may name, with its context in tokens: each available model,
    and ``base:adapter`` for each usable adapter whose base is available (reads folders:
    off the event loop)."""
    contexts = {entry.model_id: _context(server, entry.model_id)
                for entry in server.catalog.available()}
    adapters = [listing.adapter for listing in server.adapters.available()
                if listing.adapter is not None and listing.adapter.base_model in contexts]
    return [*contexts.items(), *((f"{a.base_model}:{a.name}", contexts[a.base_model])
                                 for a in adapters)]


def _context(server: Any, model_id: str) -> int | None:
    """A model's context as requests on it get it (None: its config cannot be read)."""
    try:
        return server.service.context_limit(server.catalog.read_config(model_id))
    except SemanticServerError:
        return None


async def list_models(request: Request) -> JSONResponse:
    """Every model a request may name, with where it is (``state``: serving, loading,
    retiring or available; a ``base:adapter`` is where its base is), whether it is pinned,
    and its ``context_length`` (prompt plus completion, in its own tokens)."""
    server = request.app.state.server
    ids = await asyncio.to_thread(model_ids, server)
    snapshot = server.snapshot()
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": 0, "owned_by": "semantic-server",
         "state": snapshot.model_state(model_id.partition(":")[0]),
         "pinned": model_id.partition(":")[0] in snapshot.pinned,
         "context_length": context} for model_id, context in ids]})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
