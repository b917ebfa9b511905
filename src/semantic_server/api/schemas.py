"""Request bodies of the OpenAI API, as strict as the protocol and no stricter.

Unknown fields are ignored (clients send many); wrong types are a 400 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4
MAX_STOP_CHARS = 256  # a stop string is held back and searched on every token: keep it short


def check_stop_lengths(stops: list[str]) -> None:
    if any(len(stop) > MAX_STOP_CHARS for stop in stops):
        raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


def plain_text(content: str | list[TextPart] | None) -> str:
    """Content as the chat template takes it: text parts joined, nothing for no content."""
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        return plain_text(self.content)

    def as_template_message(self) -> dict[str, str]:
        """The message as chat templates expect it (developer is the newer name of system)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    session_id: str | None = None

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        check_stop_lengths([stop] if isinstance(stop, str) else stop or [])
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return plain_text(self.content)


class AnthropicMetadata(BaseModel):
    model_config = ConfigDict(extra="ignore")
    user_id: str | None = None


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

    @field_validator("stop_sequences")
    @classmethod
    def _short_stops(cls, stops: list[str] | None) -> list[str] | None:
        check_stop_lengths(stops or [])
        return stops

    def template_messages(self) -> list[dict[str, str]]:
        system = plain_text(self.system)
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m.role, "content": m.text()} for m in self.messages]
