"""The Hermes tool format, for chat templates that take ``tools`` and write ``<tool_call>``
blocks (Qwen 2.5 and 3, Hermes, SmolLM3 and many fine-tunes).

The template itself renders the tools and the history (an assistant's calls with
``tojson``, tool results as it likes); the model answers with plain text, or with one or
more ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks. The answer
is constrained by a Lark grammar around the tools' JSON schemas, with the separators that
``tojson`` writes (``", "`` and ``": "``), so a call renders back into the history as the
very text the model wrote.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

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
from semantic_server.engine.constraints import JSON_OPTIONS, bounded_schema

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
BLOCK = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)
TOJSON = {**JSON_OPTIONS, "item_separator": ", ", "key_separator": ": "}


def tojson(value: Any) -> str:
    """JSON as a template's ``tojson`` writes it."""
    return json.dumps(value, ensure_ascii=False)


class HermesFormat:
    name = "hermes"

    @staticmethod
    def fits(template: str) -> bool:
        return "tools" in template and "<tool_call>" in template

    def render(self, turns: list[Turn], tools: list[Tool],
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for turn in turns:
            if turn.role == "tool":
                messages.append({"role": "tool", "content": turn.content,
                                 "tool_call_id": turn.call_id, "name": turn.name})
            elif turn.calls:
                messages.append({"role": "assistant", "content": turn.content, "tool_calls": [
                    {"id": c.id, "type": "function",
                     "function": {"name": c.name, "arguments": c.arguments}}
                    for c in turn.calls]})
            else:
                messages.append({"role": turn.role, "content": turn.content})
        specs = [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.parameters}}
            for t in tools]
        return messages, {"tools": specs}

    def grammar(self, tools: list[Tool], choice: ToolChoice) -> str:
        import llguidance

        allowed = [t for t in tools
                   if choice.mode is not ChoiceMode.NAMED or t.name == choice.name]
        call = {**bounded_schema({"anyOf": [
            {"type": "object", "properties": {"name": {"const": t.name},
                                              "arguments": t.parameters or {"type": "object"}},
             "required": ["name", "arguments"], "additionalProperties": False}
            for t in allowed]}), "x-guidance": TOJSON}
        several = choice.parallel and choice.mode is not ChoiceMode.NAMED
        calls = 'call ("\\n" call)*' if several else "call"
        start = {ChoiceMode.NONE: "text", ChoiceMode.AUTO: "text | calls"}.get(
            choice.mode, "calls")
        if not allowed:
            start = "text"
        lark = (f"start: {start}\ntext: /[^<](.|\\n)*/\ncalls: {calls}\n"
                f'call: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {json.dumps(call)}')
        return llguidance.LLMatcher.grammar_from_lark(lark)

    def parse(self, text: str, id_prefix: str) -> Answer:
        if not text.startswith(OPEN) and not (text and OPEN.startswith(text)):
            return Answer(text, [], True)  # (an opening cut short is a call cut short)
        blocks = BLOCK.findall(text)
        calls = []
        for block in blocks:
            value = scrub(json.loads(block))
            calls.append(ToolCall(new_call_id(id_prefix), value["name"], value["arguments"]))
        complete = bool(blocks) and text.rstrip().endswith(CLOSE.strip())
        return Answer(None if calls else "", calls, complete)

    def stream(self, id_prefix: str) -> HermesStream:
        return HermesStream(id_prefix)


@dataclass
class HermesStream:
    """Text passes through as it comes; tool calls are announced whole as each block
    closes (their arguments as one delta)."""

    id_prefix: str
    buffer: str = ""
    mode: str = "start"  # then "text" or "calls"
    calls: int = 0

    def feed(self, text: str) -> list[StreamEvent]:
        self.buffer += text
        if self.mode == "start":
            if self.buffer.startswith(OPEN):
                self.mode = "calls"
            elif not OPEN.startswith(self.buffer):
                self.mode = "text"
        if self.mode == "text":
            out, self.buffer = self.buffer, ""
            return [TextDelta(out)] if out else []
        events: list[StreamEvent] = []
        while self.mode == "calls" and (match := BLOCK.search(self.buffer)):
            value = scrub(json.loads(match.group(1)))
            events.append(CallStart(self.calls, new_call_id(self.id_prefix), value["name"]))
            events.append(ArgumentsDelta(self.calls, tojson(value["arguments"])))
            self.calls += 1
            self.buffer = self.buffer[match.end():]
        return events
