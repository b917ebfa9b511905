"""Request bodies of the OpenAI API, as strict as the protocol and no stricter.

Unknown fields are ignored (clients send many); wrong types are a 400 naming the field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # a stop string is held back and searched on every token: keep it short


MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5  # the legacy API's own limit


def check_stop_lengths(stops: list[str]) -> None:
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")


def check_stops(stop: str | list[str] | None) -> None:
    if isinstance(stop, list) and len(stop) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    check_stop_lengths([stop] if isinstance(stop, str) else stop or [])


DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_seconds(value: Any) -> Any:
    """Ollama's ``keep_alive`` as seconds: a number of seconds, or a duration such as
    "30s", "5m" or "1h" (negative: keep the model for good); anything else is left to
    the float check, which refuses it."""
    if isinstance(value, str) and (match := DURATION.fullmatch(value.strip())):
        return float(match[1]) * DURATION_UNITS[match[2]]
    return value


# How long the model a request runs on stays loaded after it (models loaded beside only).
KeepAlive = Annotated[float | None, BeforeValidator(keep_alive_seconds),
                      Field(allow_inf_nan=False)]


def stop_tuple(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


def plain_text(content: str | list[TextPart] | None) -> str:
    """Content as the chat template takes it: text parts joined, nothing for no content."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    """A function tool; any other type (custom, hosted) cannot run here and is withheld
    from the model (named in the ``X-Tools-Withheld`` header)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    function: FunctionDef | None = None

    @model_validator(mode="after")
    def _function_has_one(self) -> ToolDef:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs its function")
        return self

    def label(self) -> str:
        """The tool's name, or its type when it has none."""
        return self.function.name if self.function else self.type


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant
    tool_call_id: str | None = None  # tool

    def text(self) -> str:
        return plain_text(self.content)

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates expect it (developer is the newer name of system)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIGeneration(BaseModel):
    """What OpenAI's chat and completions requests share: sampling, stops, streaming, the
    agent and n=1."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    session_id: str | None = None
    keep_alive: KeepAlive = None
    # Accepted only at their neutral values: anything else would be silently ignored.
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @model_validator(mode="after")
    def _no_penalties(self) -> OpenAIGeneration:
        if self.logit_bias or self.presence_penalty or self.frequency_penalty:
            raise ValueError("logit_bias, presence_penalty and frequency_penalty are not "
                             "supported")
        return self

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        check_stops(stop)
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(OpenAIGeneration):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    functions: list[Any] | None = None  # the legacy spelling of tools
    function_call: Any = None

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("functions and function_call are not supported: use tools and "
                             "tool_choice")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _logprobs_asked(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_logprobs(self) -> int | None:
        """None without logprobs; else how many alternatives each token shows."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(OpenAIGeneration):
    """OpenAI's legacy completions: a prompt to continue, for base models."""

    prompt: str | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if (self.best_of or 1) != 1:
            raise ValueError("only best_of 1 is supported")
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self


class ToolUseBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextPart] = ""
    is_error: bool = False


class ThinkingBlock(BaseModel):
    """An assistant's thinking, as a client sends it back: never rendered into the prompt
    (our models do not think; Anthropic's models drop earlier turns' thinking too)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[TextPart | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                         Field(discriminator="type")]


class AnthropicMessage(BaseModel):
    """A turn: ``system`` turns may stand between the others (Claude Code sends its
    environment as one after the first user message) and are rendered where they stand."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(block.text for block in self.content if isinstance(block, TextPart))

    def blocks(self, kind: type) -> list[Any]:
        return [] if isinstance(self.content, str) else [
            block for block in self.content if isinstance(block, kind)]


class AnthropicTool(BaseModel):
    """A client tool (``type`` absent or ``custom``), or a server tool (any other type:
    web search, tool search, code execution...), which cannot run here and is withheld."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    type: str | None = None
    # Loaded only once a tool search finds it, which is a server tool: withheld too.
    defer_loading: bool = False

    def runs_here(self) -> bool:
        return self.type in (None, "custom") and not self.defer_loading


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class AnthropicMetadata(BaseModel):
    """The client's own metadata: never a reason for a 400 (``user_id`` may be a JSON
    object in a string, as Claude Code sends it)."""

    model_config = ConfigDict(extra="ignore")
    user_id: Any = None


class ThinkingConfig(BaseModel):
    """Extended thinking. Accepted in all three forms; a model that does not think answers
    without thinking blocks (``adaptive`` lets the model decide, ``enabled``'s budget is a
    ceiling it does not reach), documented in README."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1024)

    @model_validator(mode="after")
    def _budget(self) -> ThinkingConfig:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("thinking of type enabled needs budget_tokens")
        return self


class ValueOf(BaseModel):
    """``{"type": ..., "value": N}``, as context edits count their triggers and keeps."""

    model_config = ConfigDict(extra="ignore")
    type: str
    value: int = Field(ge=0)


CLEAR_TOOL_USES = "clear_tool_uses_20250919"
CLEAR_THINKING = "clear_thinking_20251015"


class ContextEdit(BaseModel):
    """One of Anthropic's documented context edits; another type is a 400."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["clear_tool_uses_20250919", "clear_thinking_20251015"]
    trigger: ValueOf | None = None
    keep: ValueOf | Literal["all"] | None = None
    clear_at_least: ValueOf | None = None
    exclude_tools: list[str] = Field(default_factory=list)
    clear_tool_inputs: bool | list[str] = False

    @model_validator(mode="after")
    def _units(self) -> ContextEdit:
        if self.trigger is not None and self.trigger.type not in ("input_tokens", "tool_uses"):
            raise ValueError("a trigger counts input_tokens or tool_uses")
        if self.type == CLEAR_TOOL_USES and isinstance(self.keep, str):
            raise ValueError("clear_tool_uses keeps a number of tool_uses")
        return self


class ContextManagement(BaseModel):
    model_config = ConfigDict(extra="ignore")
    edits: list[ContextEdit] = Field(default_factory=list)


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    """``effort`` tunes how much a thinking model thinks (nothing to tune on a model that
    does not think); ``format`` constrains the answer to a JSON schema."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class MessagesRequest(BaseModel):
    """Anthropic's Messages API: max_tokens is required, the system prompt is separate."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextPart] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOPS)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    metadata: AnthropicMetadata | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    top_k: int | None = None
    thinking: ThinkingConfig | None = None
    context_management: ContextManagement | None = None
    output_config: OutputConfig | None = None
    keep_alive: KeepAlive = None

    @field_validator("top_k")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("top_k is not supported")
        return value

    @field_validator("stop_sequences")
    @classmethod
    def _short_stops(cls, stops: list[str] | None) -> list[str] | None:
        check_stop_lengths(stops or [])
        return stops

    def system_blocks(self) -> list[str]:
        """The system prompt's texts, less Claude Code's billing line: it is metadata for
        Anthropic's billing, not for the model, and a value in it that changed per request
        would defeat every prefix cache."""
        blocks = [self.system] if isinstance(self.system, str) else [
            part.text for part in self.system or []]
        return [text for text in blocks if text and not text.startswith(BILLING_LINE)]

    def system_text(self) -> str:
        return "\n\n".join(self.system_blocks())


BILLING_LINE = "x-anthropic-billing-header:"


class CountTokensRequest(MessagesRequest):
    """``POST /v1/messages/count_tokens``: a Messages request without max_tokens."""

    max_tokens: int = 1
