"""The neutral types of a conversation with tools, whatever API carried it and whatever
format the model writes: tools and the choice among them, turns, tool calls, a parsed
answer and the events of a streamed one. Every tool format (``tools.py``'s generic one,
``hermes_tools.py``) and every route speaks these.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ChoiceMode(StrEnum):
    NONE = "none"  # reply only
    AUTO = "auto"  # reply or call tools
    REQUIRED = "required"  # call at least one tool
    NAMED = "named"  # call this one tool


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode = ChoiceMode.AUTO
    name: str | None = None  # with NAMED
    parallel: bool = True  # several calls in one answer


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation with tools, whatever API it came in: a system, user or
    assistant text, an assistant's tool calls, or a tool's result."""

    role: str  # "system", "user", "assistant" or "tool"
    content: str = ""
    calls: tuple[ToolCall, ...] = ()  # an assistant's
    call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None  # a tool result: the tool's name


def new_call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Answer:
    """What the model answered: a reply, or tool calls; ``complete`` is False when the
    answer was cut (by max_tokens) before its JSON closed."""

    text: str | None
    calls: list[ToolCall]
    complete: bool


def scrub(value: Any) -> Any:
    """``value`` with lone surrogates (a model can write an unpaired ``\\ud83d``) replaced
    by U+FFFD, so it can be sent as UTF-8."""
    if isinstance(value, str):  # json.loads has joined every valid pair already
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, list):
        return [scrub(item) for item in value]
    if isinstance(value, dict):
        return {scrub(key): scrub(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    json: str


StreamEvent = TextDelta | CallStart | ArgumentsDelta


UNPARSED = "_unparsed"


def history_arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments as a client sends them back in the history: a JSON object
    as it is; anything else (a call that ``max_tokens`` cut short, which agents echo back,
    as OpenAI's API accepts) kept whole under ``_unparsed``, so the model sees what it
    wrote and the request is not refused for the server's own cut."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {UNPARSED: text}
