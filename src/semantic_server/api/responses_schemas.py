"""Request bodies of OpenAI's Responses API (``POST /v1/responses``), as strict as the
protocol and no stricter: unknown fields are ignored, wrong types are a 400 naming the
field, and a field the server cannot honour is a 400 saying so.

Accepted as hints that models here have nothing to tune with (README, "Codex CLI"):
``reasoning`` (no model here reasons, so no reasoning items come back), ``text.verbosity``,
``service_tier``, and ``include`` values that name outputs of hosted tools, which never
run here. Input ``reasoning`` items (Codex sends earlier turns' back) render as nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from semantic_server.api.schemas import TOOL_NAME, KeepAlive


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextContent(_Loose):
    type: Literal["input_text", "output_text", "text"]
    text: str


class RefusalContent(_Loose):
    type: Literal["refusal"]
    refusal: str


Content = Annotated[TextContent | RefusalContent, Field(discriminator="type")]


def content_text(content: str | list[Any]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.text if isinstance(part, TextContent) else part.refusal
                   for part in content)


class MessageItem(_Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Content]

    def text(self) -> str:
        return content_text(self.content)


class FunctionCallItem(_Loose):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(_Loose):
    """A tool's result. Codex also sends results of its own with no ``call_id``, named by
    ``name`` (and ``namespace``) instead: rendered as that tool's result."""

    type: Literal["function_call_output"]
    call_id: str | None = Field(None, min_length=1)
    name: str | None = None
    namespace: str | None = None
    output: str | list[Content]

    def text(self) -> str:
        return content_text(self.output)


class ReasoningItem(_Loose):
    type: Literal["reasoning"]


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(
        value, "type", "message")
    return kind if kind in ITEM_KINDS else "unsupported"


class UnsupportedItem(_Loose):
    """An input item of a kind that cannot be honoured here (hosted tools' calls, item
    references, images...): always a 400 naming its type."""

    type: str

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedItem:
        raise ValueError(f"input items of type {self.type!r} are not supported")


ITEM_KINDS = ("message", "function_call", "function_call_output", "reasoning")
InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")] | Annotated[UnsupportedItem, Tag("unsupported")],
    Discriminator(_item_kind)]


class ResponsesTool(_Loose):
    """A function tool, a ``namespace`` of them (Codex groups its MCP tools so), or a
    hosted tool (web search, file search...), which cannot run here and is withheld."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool = False
    tools: list[ResponsesTool] | None = None  # a namespace's

    @model_validator(mode="after")
    def _named(self) -> ResponsesTool:
        if self.type in ("function", "namespace") and not self.name:
            raise ValueError(f"a {self.type} tool needs a name")
        if self.type == "function" and not re.fullmatch(TOOL_NAME, self.name or ""):
            raise ValueError("a function's name is 1-64 characters of A-Z a-z 0-9 _ -")
        if self.type == "namespace" and self.tools is None:
            raise ValueError("a namespace tool needs its tools")
        return self

    def label(self) -> str:
        return self.name or self.type


class FunctionChoice(_Loose):
    type: Literal["function"]
    name: str


class TextFormat(_Loose):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Loose):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class Reasoning(_Loose):
    effort: str | None = None
    summary: str | None = None


UNSUPPORTED_INCLUDES = ("message.output_text.logprobs",)


class ResponsesRequest(_Loose):
    model: str | None = None
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    prompt_cache_key: str | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    reasoning: Reasoning | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    keep_alive: KeepAlive = None

    @field_validator("temperature", "top_p", "stream", "store", "parallel_tool_calls",
                     mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        """OpenAI's API takes an explicit null for these: it means the default."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("include")
    @classmethod
    def _includable(cls, include: list[str] | None) -> list[str] | None:
        refused = [name for name in include or [] if name in UNSUPPORTED_INCLUDES]
        if refused:
            raise ValueError(f"include {refused[0]!r} is not supported")
        return include

    @field_validator("background", "conversation", "prompt", "max_tool_calls",
                     "top_logprobs")
    @classmethod
    def _not_here(cls, value: Any) -> Any:
        if value:
            raise ValueError("not supported here")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise ValueError("truncation 'auto' is not supported: the whole input is kept, "
                             "and an input over the context is a 400")
        return value

    def items(self) -> list[Any]:
        """The input as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)
