"""OpenAI's Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE
/v1/responses/{id}``, on the same engine, agents and caches as chat completions.

Server-side state is agent state. A stored response (``store``, true by default) records
its tenant, its agent and the conversation up to its own output
(``cache/response_records.py``); ``previous_response_id`` continues that conversation on
that agent, whose KV cache already holds it, so only the new input is prefilled, after a
restart or a swap round trip as well (the cache is an agent cache like any other). Two
requests that continue one response run one after the other on its agent: the second
keeps the prefix they share and prefills only its own part. Without a previous response
the agent is named as on every API (``prompt_cache_key``, Codex's ``session-id`` header,
``X-Agent-ID``...); a stored response without one gets an agent of its own.

Function tools (and ``namespace`` groups of them) take the admitted model's tool format
(``api/tools.py``); a namespaced function is offered to the model as ``namespace.name``
and comes back as a ``function_call`` with its ``namespace``. Hosted tools (web search,
file search...) cannot run here: they are withheld and named in ``X-Tools-Withheld``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import TypeAdapter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semantic_server.api import tools as t
from semantic_server.api.errors import stream_error
from semantic_server.api.identity import agent_id_of, family, tenant_of
from semantic_server.api.request_id import request_id_of
from semantic_server.api.responses_schemas import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    InputItem,
    MessageItem,
    ResponsesRequest,
    ResponsesTool,
)
from semantic_server.api.tool_types import history_arguments
from semantic_server.api.turn import (
    ANY_OBJECT,
    capped_max_tokens,
    collect,
    read_json,
    relay,
    schema_grammar,
    wait_admitted,
    withheld_header,
)
from semantic_server.cache.response_records import ResponseRecord
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import (
    Admitted,
    GenerationParams,
    Grammar,
    Rendered,
    Renderer,
    TokenLogprob,
)
from semantic_server.errors import InvalidRequest, ResponseNotFound
from semantic_server.request_outcome import FinishReason, Outcome

ITEMS = TypeAdapter(list[InputItem])
# A failed response's error.code is one of OpenAI's own (a closed set); ours map onto it.
FAILED_CODES = {"context_length_exceeded": "invalid_prompt", "invalid_request": "invalid_prompt",
                "queue_full": "rate_limit_exceeded", "agent_busy": "rate_limit_exceeded"}


@dataclass
class Toolset:
    """The tools offered to the model, those withheld, and each namespaced function's
    (namespace, name) by the name the model sees."""

    tools: list[t.Tool] = field(default_factory=list)
    withheld: list[str] = field(default_factory=list)
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)

    def add(self, tool: ResponsesTool, namespace: str | None = None) -> None:
        label = f"{namespace}.{tool.label()}" if namespace else tool.label()
        if tool.type == "namespace" and namespace is None:
            for inner in tool.tools or []:
                self.add(inner, tool.name)
        elif tool.type == "function" and not tool.defer_loading:
            self.tools.append(t.Tool(label, tool.description or "",
                                     tool.parameters or {"type": "object"}))
            if namespace:
                self.namespaced[label] = (namespace, tool.label())
        else:  # hosted, deferred (found only by a hosted tool search) or nested too deep
            self.withheld.append(label)

    def call_item(self, call: t.ToolCall) -> dict[str, Any]:
        """A tool call as a ``function_call`` output item."""
        namespace, name = self.namespaced.get(call.name, (None, call.name))
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "completed",
                "call_id": call.id, "name": name, "arguments": t.compact(call.arguments)}
        return {**item, "namespace": namespace} if namespace else item


def _toolset(declared: list[ResponsesTool]) -> Toolset:
    toolset = Toolset()
    for tool in declared:
        toolset.add(tool)
    return toolset


def _turns(instructions: str | None, items: list[Any]) -> list[t.Turn]:
    """The conversation in the neutral form every tool format renders: consecutive
    function calls (and the assistant text before them) are one assistant turn."""
    turns = [t.Turn("system", instructions)] if instructions else []
    names: dict[str, str] = {}  # call_id -> the tool's name as the model sees it
    calling = False  # the last turn is an assistant's that more calls may join
    for item in items:
        if isinstance(item, FunctionCallItem):
            name = f"{item.namespace}.{item.name}" if item.namespace else item.name
            call = t.ToolCall(item.call_id, name, history_arguments(item.arguments))
            names[item.call_id] = name
            if calling:
                turns[-1] = replace(turns[-1], calls=(*turns[-1].calls, call))
            else:
                turns.append(t.Turn("assistant", "", (call,)))
            calling = True
            continue
        calling = False
        if isinstance(item, FunctionCallOutputItem) and item.call_id is None:
            name = f"{item.namespace}.{item.name}" if item.namespace else item.name
            turns.append(t.Turn("tool", item.text(), call_id="", name=name or "tool"))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in names:
                raise InvalidRequest(f"a function_call_output answers call_id "
                                     f"{item.call_id!r}, which no function_call made",
                                     param="input")
            turns.append(t.Turn("tool", item.text(), call_id=item.call_id,
                                name=names[item.call_id]))
        elif isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            turns.append(t.Turn(role, item.text()))
            calling = role == "assistant"
        # reasoning items render as nothing: no model here reasons
    return turns


def _choice(spec: Any, parallel: bool) -> t.ToolChoice:
    if spec is None:
        return t.ToolChoice(t.ChoiceMode.AUTO, None, parallel)
    if isinstance(spec, FunctionChoice):
        return t.ToolChoice(t.ChoiceMode.NAMED, spec.name, parallel)
    return t.ToolChoice(t.ChoiceMode(spec), None, parallel)


def _format_grammar(body: ResponsesRequest) -> Grammar | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return schema_grammar(ANY_OBJECT, "text.format")
    if not fmt.schema_:
        raise InvalidRequest("text.format json_schema needs a schema", param="text.format")
    return schema_grammar(fmt.schema_, "text.format.schema")


def prepare(body: ResponsesRequest, items: list[Any], toolset: Toolset) -> Renderer:
    """The renderer of the conversation: the admitted model's tool format when tools are
    on, else the chat template (with the answer's grammar, if ``text.format`` asks)."""
    choice = _choice(body.tool_choice, body.parallel_tool_calls)
    t.check_tools(toolset.tools, choice, "tools")
    turns = _turns(body.instructions, items)
    grammar = _format_grammar(body)
    tools_on = bool(toolset.tools) or any(turn.role == "tool" or turn.calls for turn in turns)
    if tools_on and grammar is not None:
        raise InvalidRequest("text.format cannot be combined with tools here; ask for a "
                             "function whose parameters are the schema", param="text.format")
    if tools_on:
        return t.renderer(turns, toolset.tools, choice)
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    return lambda tokenizer: Rendered(messages, grammar=grammar)


def _usage(outcome: Outcome) -> dict[str, Any]:
    return {"input_tokens": outcome.prompt_tokens,
            "input_tokens_details": {"cached_tokens": outcome.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": outcome.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def _message_item(text: str, status: str = "completed", item_id: str | None = None,
                  ) -> dict[str, Any]:
    return {"id": item_id or f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
            "status": status, "content": [
                {"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _as_input(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item that stands for it in a later turn."""
    if item["type"] == "message":
        return {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": item["content"][0]["text"]}]}
    return {key: item[key] for key in ("type", "call_id", "name", "arguments", "namespace")
            if key in item}


@dataclass
class Turn:
    """One Responses request on its way: what it continues, the agent that runs it, and
    the response object it is building."""

    body: ResponsesRequest
    raw: dict[str, Any]
    tenant: str | None
    agent: str | None
    history: list[dict[str, Any]]  # the stored conversation it continues
    new_items: list[dict[str, Any]]  # its own input, as items
    toolset: Toolset
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def response(self, model: str, status: str, output: list[dict[str, Any]],
                 outcome: Outcome | None = None) -> dict[str, Any]:
        body = self.body
        incomplete = (outcome is not None and outcome.finish_reason is FinishReason.LENGTH)
        if incomplete and output and output[-1]["type"] == "message":  # the item cut short
            output = [*output[:-1], {**output[-1], "status": "incomplete"}]
        return {
            "id": self.response_id, "object": "response", "created_at": self.created,
            "status": "incomplete" if incomplete else status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": model, "output": output, "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store,
            "temperature": body.temperature, "top_p": body.top_p,
            "text": self.raw.get("text") or {"format": {"type": "text"}},
            "tool_choice": self.raw.get("tool_choice") or "auto",
            "tools": self.raw.get("tools") or [], "truncation": "disabled",
            "usage": _usage(outcome) if outcome is not None else None,
            "user": body.user, "metadata": body.metadata or {},
            "prompt_cache_key": body.prompt_cache_key}

    def record(self, response: dict[str, Any]) -> ResponseRecord:
        output = [_as_input(item) for item in response["output"]]
        return ResponseRecord(self.response_id, self.tenant, self.agent,
                              [*self.history, *self.new_items, *output], response)


def output_items(text: str, fmt: Any, toolset: Toolset) -> list[dict[str, Any]]:
    """The output items of a whole answer: its text, its tool calls, or both."""
    if fmt is None:
        return [_message_item(text)]
    answer = fmt.parse(text, "call_")
    calls = [toolset.call_item(call) for call in answer.calls]
    return calls if calls and not answer.text else [_message_item(answer.text or ""), *calls]


async def _start(request: Request) -> Turn:
    """Parse the request and find what it continues and which agent runs it."""
    server = request.app.state.server
    raw = await read_json(request, server.settings.max_body_bytes)
    body = ResponsesRequest.model_validate(raw)
    tenant = tenant_of(request)
    history: list[dict[str, Any]] = []
    agent = None
    if body.previous_response_id is not None:
        parent = await asyncio.to_thread(server.responses.get, tenant,
                                         body.previous_response_id)
        if parent is None:
            raise ResponseNotFound(f"no stored response {body.previous_response_id!r}")
        history, agent = parent.items, parent.agent
    toolset = _toolset(body.tools or [])
    new_items = [item.model_dump(mode="json", by_alias=True, exclude_none=True)
                 for item in body.items()]
    turn = Turn(body, raw, tenant, agent, history, new_items, toolset)
    if turn.agent is None:
        turn.agent = agent_id_of(request, raw, family_of=family(
            body.instructions or "", (tool.label() for tool in body.tools or [])))
    if turn.agent is None and body.store:  # a stored response's own agent
        turn.agent = f"{tenant}/{turn.response_id}" if tenant else turn.response_id
    return turn


async def create(request: Request) -> Response:
    server = request.app.state.server
    turn = await _start(request)
    body = turn.body
    items = ITEMS.validate_python([*turn.history, *turn.new_items])
    render = prepare(body, items, turn.toolset)
    params = GenerationParams(
        max_tokens=capped_max_tokens(request, body.max_output_tokens),
        sampling=SamplingParams(body.temperature, body.top_p), keep_alive=body.keep_alive)
    generation = server.service.generate(turn.agent, render, params, body.model,
                                         request_id_of(request), turn.tenant)
    admitted = await wait_admitted(generation)
    headers = withheld_header(turn.toolset.withheld)
    if not body.stream:
        done = await collect(generation)
        output = output_items(done.text, admitted.context, turn.toolset)
        response = turn.response(done.outcome.model_id, "completed", output, done.outcome)
        if body.store:
            await asyncio.to_thread(server.responses.put, turn.record(response))
        return JSONResponse(response, headers=headers)
    return StreamingResponse(_events(server, turn, generation, admitted),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


class _Events:
    """The streamed events of one response: each numbered, each output item opened as its
    first piece arrives and closed before the next one opens."""

    def __init__(self, turn: Turn, model: str) -> None:
        self.turn = turn
        self.model = model
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text = ""

    def event(self, kind: str, **data: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def where(self) -> dict[str, Any]:
        return {"item_id": self.open["id"], "output_index": len(self.output)}

    def start(self) -> list[str]:
        response = self.turn.response(self.model, "in_progress", [])
        return [self.event("response.created", response=response),
                self.event("response.in_progress", response=response)]

    def text_delta(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self.close()
            self.open, self.text = _message_item("", "in_progress"), ""
            self.open["content"] = []
            events += [self.event("response.output_item.added", item=self.open,
                                  output_index=len(self.output)),
                       self.event("response.content_part.added", **self.where(),
                                  content_index=0, part={"type": "output_text", "text": "",
                                                         "annotations": [], "logprobs": []})]
        self.text += text
        return [*events, self.event("response.output_text.delta", **self.where(),
                                    content_index=0, delta=text, logprobs=[])]

    def call_start(self, call_id: str, name: str) -> list[str]:
        events = self.close()
        item = self.turn.toolset.call_item(t.ToolCall(call_id, name, {}))
        self.open = {**item, "status": "in_progress", "arguments": ""}
        return [*events, self.event("response.output_item.added", item=self.open,
                                    output_index=len(self.output))]

    def arguments(self, piece: str) -> list[str]:
        self.open["arguments"] += piece
        return [self.event("response.function_call_arguments.delta", **self.where(),
                           delta=piece)]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        item, events = self.open, []
        if item["type"] == "message":
            part = {"type": "output_text", "text": self.text, "annotations": [],
                    "logprobs": []}
            events += [self.event("response.output_text.done", **self.where(),
                                  content_index=0, text=self.text, logprobs=[]),
                       self.event("response.content_part.done", **self.where(),
                                  content_index=0, part=part)]
            item = {**item, "content": [part]}
        else:
            events.append(self.event("response.function_call_arguments.done", **self.where(),
                                     arguments=item["arguments"]))
        item = {**item, "status": "completed"}
        events.append(self.event("response.output_item.done", item=item,
                                 output_index=len(self.output)))
        self.output.append(item)
        self.open = None
        return events

    def piece(self, answer: Any, text: str) -> list[str]:
        if answer is None:
            return self.text_delta(text)
        events = []
        for event in answer.feed(text):
            if isinstance(event, t.TextDelta):
                events += self.text_delta(event.text)
            elif isinstance(event, t.CallStart):
                events += self.call_start(event.id, event.name)
            else:
                events += self.arguments(event.json)
        return events


async def _events(server: Any, turn: Turn,
                  generation: AsyncIterator[Admitted | str | TokenLogprob | Outcome],
                  admitted: Admitted) -> AsyncIterator[str]:
    events = _Events(turn, admitted.model_id)
    for event in events.start():
        yield event
    answer = admitted.context.stream("call_") if admitted.context else None
    async with aclosing(relay(generation)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):  # an error event, then the response failed
                error = stream_error(item)["error"]
                yield events.event("error", code=error.get("code"),
                                   message=error.get("message"), param=error.get("param"))
                failed = turn.response(events.model, "failed", events.output)
                failed["error"] = {"code": FAILED_CODES.get(error.get("code"), "server_error"),
                                   "message": error.get("message")}
                yield events.event("response.failed", response=failed)
                return
            if isinstance(item, TokenLogprob):
                continue
            if isinstance(item, str):
                for event in events.piece(answer, item):
                    yield event
                continue
            if not events.output and events.open is None:  # an empty answer is a message
                for event in events.text_delta(""):
                    yield event
            for event in events.close():
                yield event
            response = turn.response(item.model_id, "completed", events.output, item)
            if turn.body.store:
                await asyncio.to_thread(server.responses.put, turn.record(response))
            kind = ("response.incomplete" if response["status"] == "incomplete"
                    else "response.completed")
            yield events.event(kind, response=response)


async def retrieve(request: Request) -> Response:
    server = request.app.state.server
    response_id = request.path_params["response_id"]
    record = await asyncio.to_thread(server.responses.get, tenant_of(request), response_id)
    if record is None:
        raise ResponseNotFound(f"no stored response {response_id!r}")
    return JSONResponse(record.response)


async def delete(request: Request) -> Response:
    server = request.app.state.server
    response_id = request.path_params["response_id"]
    if not await asyncio.to_thread(server.responses.delete, tenant_of(request), response_id):
        raise ResponseNotFound(f"no stored response {response_id!r}")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


routes = [
    Route("/v1/responses", create, methods=["POST"]),
    Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
]
