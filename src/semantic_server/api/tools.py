"""Tools, as both chat APIs (OpenAI's and Anthropic's) take them, in the format the
admitted model's chat template calls for.

A template that takes ``tools`` and writes Hermes-style ``<tool_call>`` blocks (Qwen,
Hermes, SmolLM3...) gets its own format (``hermes_tools.py``). Every other model gets one
documented generic format (README, "Tools"), as llama.cpp does for templates without
native tool calling:

- the tools are described in the system turn, one JSON object a line;
- the model answers with one JSON object and nothing else: ``{"tool_calls":[{"name":
  "<tool>","arguments":{...}}]}`` to call tools, ``{"response":"<text>"}`` to reply;
- that answer is *constrained* by a grammar built from the tools' JSON schemas and the
  tool choice, so it always parses, names a given tool and has arguments that validate;
- the history is rendered the same way: an assistant's tool calls as the JSON it produced,
  an assistant reply as ``{"response":...}``, a tool result as a user turn
  ``{"tool_result":{"id":...,"name":...,"content":...}}``. JSON is compact and keeps key
  order, so a turn renders to the tokens the agent's cache holds and the next turn
  prefills only what is new.

``OutputStream`` turns the answer into text deltas or tool-call deltas while it streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from semantic_server.api.hermes_tools import HermesFormat
from semantic_server.api.tool_types import (
    Answer,
    ArgumentsDelta,
    CallStart,
    ChoiceMode,
    StreamEvent,
    TextDelta,
    Tool,
    ToolCall,
    ToolChoice,
    Turn,
    new_call_id,
    scrub,
)
from semantic_server.engine.constraints import json_schema_grammar
from semantic_server.engine.service import Grammar, Rendered, Renderer
from semantic_server.errors import InvalidRequest

COMPACT = (",", ":")
STOP_WITH_TOOLS = ("stop sequences cannot be combined with tools: the answer is JSON, which a "
                   "stop sequence would cut")


def compact(value: Any) -> str:
    """JSON as the grammar makes the model write it: no spaces, keys in their order."""
    return json.dumps(value, separators=COMPACT, ensure_ascii=False)


def check_tools(tools: list[Tool], choice: ToolChoice, param: str) -> None:
    """Refuse what cannot be honoured: duplicate names, a named choice of no given tool."""
    names = [tool.name for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tool names must be unique", param=param)
    if choice.mode is ChoiceMode.NAMED and choice.name not in names:
        raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not among the "
                             "tools", param="tool_choice")
    if not tools and choice.mode in (ChoiceMode.REQUIRED, ChoiceMode.NAMED):
        raise InvalidRequest("tool_choice asks for a tool call but no tools are given",
                             param="tool_choice")


def system_text(tools: list[Tool]) -> str:
    """The tools' description, appended to the system turn."""
    lines = [compact({"name": t.name, "description": t.description,
                      "parameters": t.parameters}) for t in tools]
    return ("You can call these tools:\n" + "\n".join(lines) + "\nAnswer with one JSON "
            'object and nothing else: {"tool_calls":[{"name":"<tool>","arguments":{...}}]}'
            ' to call tools, or {"response":"<your reply>"} to reply.')


def output_schema(tools: list[Tool], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema of the answer the tool choice allows."""
    reply = {"type": "object", "properties": {"response": {"type": "string"}},
             "required": ["response"], "additionalProperties": False}
    if choice.mode is ChoiceMode.NONE or not tools:
        return reply
    allowed = [t for t in tools if choice.mode is not ChoiceMode.NAMED or t.name == choice.name]
    call = {"anyOf": [{"type": "object",
                       "properties": {"name": {"const": t.name},
                                      "arguments": t.parameters or {"type": "object"}},
                       "required": ["name", "arguments"], "additionalProperties": False}
                      for t in allowed]}
    calls: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if not choice.parallel or choice.mode is ChoiceMode.NAMED:
        calls["maxItems"] = 1
    tool_calls = {"type": "object", "properties": {"tool_calls": calls},
                  "required": ["tool_calls"], "additionalProperties": False}
    return {"anyOf": [tool_calls, reply]} if choice.mode is ChoiceMode.AUTO else tool_calls


def calls_text(calls: list[ToolCall]) -> str:
    """An assistant's tool calls as the model wrote them."""
    return compact({"tool_calls": [{"name": c.name, "arguments": c.arguments} for c in calls]})


def reply_text(text: str) -> str:
    """An assistant's reply as the model wrote it while tools were offered."""
    return compact({"response": text})


def result_text(call_id: str, name: str, content: str) -> str:
    """A tool's result, as the user turn that hands it to the model."""
    return compact({"tool_result": {"id": call_id, "name": name, "content": content}})


def with_tools(messages: list[dict[str, str]], tools: list[Tool]) -> list[dict[str, str]]:
    """``messages`` with the tools described at the end of the system turn (a system turn
    is added when there is none); unchanged without tools."""
    if not tools:
        return messages
    block = system_text(tools)
    if messages and messages[0]["role"] == "system":
        head = messages[0]["content"]
        return [{"role": "system", "content": f"{head}\n\n{block}" if head else block},
                *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def generic_messages(turns: list[Turn], tools: list[Tool]) -> list[dict[str, str]]:
    """The conversation as template messages in the generic format."""
    messages = []
    for turn in turns:
        if turn.role == "tool":
            messages.append({"role": "user", "content": result_text(
                turn.call_id or "", turn.name or "", turn.content)})
        elif turn.role == "assistant":
            messages.append({"role": "assistant", "content": calls_text(list(turn.calls))
                             if turn.calls else reply_text(turn.content)})
        else:
            messages.append({"role": turn.role, "content": turn.content})
    return with_tools(messages, tools)


def parse_answer(output: str, id_prefix: str = "call_") -> Answer:
    """The answer in ``output``. One cut short (by max_tokens) gives what its stream sent:
    the reply text it had reached, or the tool calls that had closed (a call cut short is
    neither: its arguments would not parse)."""
    try:
        value = scrub(json.loads(output))
    except ValueError:
        reached = OutputStream(id_prefix).feed(output)
        arguments = {e.index: e.json for e in reached if isinstance(e, ArgumentsDelta)}
        calls = [ToolCall(e.id, e.name, scrub(json.loads(arguments[e.index])))
                 for e in reached if isinstance(e, CallStart)]
        text = "".join(e.text for e in reached if isinstance(e, TextDelta))
        return Answer(None if calls else text, calls, False)
    if "tool_calls" in value:
        return Answer(None, [ToolCall(new_call_id(id_prefix), c["name"], c["arguments"])
                             for c in value["tool_calls"]], True)
    return Answer(value.get("response", ""), [], True)


# ---- streaming --------------------------------------------------------------------------
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}
_REPLY = '{"response":"'
_CALLS = '{"tool_calls":['
_NAME = '{"name":"'
_ARGS = '","arguments":'


def _unicode_escape(text: str) -> tuple[str | None, int]:
    """The character of a ``\\uXXXX`` escape at the start of ``text`` (a surrogate pair
    takes two) and its width; (None, 0) while it is not whole yet."""
    if len(text) < 6:
        return None, 0
    point = int(text[2:6], 16)
    if 0xDC00 <= point <= 0xDFFF:  # a low surrogate alone
        return "\ufffd", 6
    if not 0xD800 <= point < 0xDC00:
        return chr(point), 6
    if len(text) < 12:
        return None, 0
    if text[6:8] != "\\u" or not 0xDC00 <= (low := int(text[8:12], 16)) <= 0xDFFF:
        return "\ufffd", 6  # a high surrogate alone
    return chr(0x10000 + ((point - 0xD800) << 10) + (low - 0xDC00)), 12


@dataclass
class OutputStream:
    """Turns the answer's text, as it streams, into reply text or tool-call deltas.

    The grammar guarantees the answer's shape (compact JSON, keys in order), so a small
    state machine follows it: the reply's JSON string is unescaped as it comes; each tool
    call is passed on whole once its arguments close (its start, then its arguments' JSON
    in one piece), so a call that max_tokens cuts short is never sent, as parsing the whole
    answer does not return it either (README, "What is constrained").
    """

    id_prefix: str = "call_"
    buffer: str = ""
    state: str = "start"
    calls: int = 0
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    call: CallStart | None = None  # the call whose arguments are coming
    arguments: str = ""  # its arguments so far

    def feed(self, text: str) -> list[StreamEvent]:
        self.buffer += text
        return list(self._advance())

    def _advance(self) -> Iterator[StreamEvent]:
        while self.buffer:
            before = (self.state, len(self.buffer))
            if self.state == "start":
                yield from self._start()
            elif self.state == "reply":
                yield from self._reply()
            elif self.state == "name":
                self._name()
            elif self.state == "arguments":
                yield from self._arguments()
            elif self.state == "between":
                self._between()
            else:  # "done": whatever follows the closing brace is not ours to show
                self.buffer = ""
            if (self.state, len(self.buffer)) == before:
                return  # waiting for more text

    def _start(self) -> Iterator[StreamEvent]:
        for prefix, state in ((_REPLY, "reply"), (_CALLS, "between")):
            if self.buffer.startswith(prefix):
                self.buffer, self.state = self.buffer[len(prefix):], state
                return
        if not (_REPLY.startswith(self.buffer) or _CALLS.startswith(self.buffer)):
            self.state = "done"  # not the generic format (cannot happen under the grammar)
        yield from ()

    def _reply(self) -> Iterator[StreamEvent]:
        """Unescape the reply string as it comes; an escape not yet whole waits."""
        out, i, text = [], 0, self.buffer
        while i < len(text) and self.state == "reply":
            char = text[i]
            if char == '"':
                self.state = "done"
            elif char != "\\":
                out.append(char)
            elif i + 1 >= len(text):
                break
            elif text[i + 1] != "u":
                out.append(_ESCAPES.get(text[i + 1], text[i + 1]))
                i += 1
            else:
                decoded, width = _unicode_escape(text[i:])
                if decoded is None:
                    break
                out.append(decoded)
                i += width - 1
            i += 1
        self.buffer = "" if self.state == "done" else text[i:]
        if out:
            yield TextDelta("".join(out))

    def _between(self) -> None:
        if self.buffer[0] in "},":  # the end of the call just streamed, or the next one
            self.buffer = self.buffer[1:]
        elif self.buffer.startswith("]}"):
            self.state, self.buffer = "done", ""
        elif self.buffer.startswith(_NAME):
            self.state, self.buffer = "name", self.buffer[len(_NAME):]
        elif not (_NAME.startswith(self.buffer) or "]}".startswith(self.buffer)):
            self.state = "done"

    def _name(self) -> None:
        end = self.buffer.find(_ARGS)
        if end < 0:
            return
        name, self.buffer = self.buffer[:end], self.buffer[end + len(_ARGS):]
        self.state, self.depth, self.in_string, self.escaped = "arguments", 0, False, False
        self.call = CallStart(self.calls, new_call_id(self.id_prefix), json.loads(f'"{name}"'))
        self.arguments = ""

    def _arguments(self) -> Iterator[StreamEvent]:
        for i, char in enumerate(self.buffer):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                continue
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0 and self.call is not None:  # the arguments closed
                    self.arguments += self.buffer[:i + 1]
                    self.buffer, self.state = self.buffer[i + 1:], "between"
                    self.calls += 1
                    yield self.call
                    yield ArgumentsDelta(self.call.index, self.arguments)
                    return
        self.arguments, self.buffer = self.arguments + self.buffer, ""


# ---- the format of the admitted model -------------------------------------------------------
class GenericFormat:
    """The generic format (this module's functions) behind the interface every format has."""

    name = "generic"

    def render(self, turns: list[Turn], tools: list[Tool],
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        return generic_messages(turns, tools), {}

    def grammar(self, tools: list[Tool], choice: ToolChoice) -> str:
        return json_schema_grammar(output_schema(tools, choice))

    def parse(self, text: str, id_prefix: str) -> Answer:
        return parse_answer(text, id_prefix)

    def stream(self, id_prefix: str) -> OutputStream:
        return OutputStream(id_prefix)


def answer_format(tokenizer: Any) -> Any:
    """The tool format of a model: its template's own when we know it, else the generic."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return HermesFormat() if HermesFormat.fits(template) else GenericFormat()


def renderer(turns: list[Turn], tools: list[Tool], choice: ToolChoice) -> Renderer:
    """The prompt and answer grammar of a conversation with tools, made for whichever model
    the request is admitted to; ``Admitted.context`` is the format that reads the answer."""
    def render(tokenizer: Any) -> Rendered:
        fmt = answer_format(tokenizer)
        messages, template_args = fmt.render(turns, tools)
        try:
            grammar = fmt.grammar(tools, choice)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"tools cannot be used: {exc}", param="tools") from exc
        return Rendered(messages, template_args, Grammar(grammar, "tools"), fmt)

    return render
