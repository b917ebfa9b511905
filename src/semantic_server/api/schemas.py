"""Request bodies of the OpenAI API, as strict as the protocol and no stricter.

Unknown fields are ignored (clients send many); wrong types are a 400 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
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
    stop_sequences: list[str] | None = Field(None, max_length=4)
    temperature: float = Field(1.0, ge=0, le=1)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False
    metadata: AnthropicMetadata | None = None

    def template_messages(self) -> list[dict[str, str]]:
        system = plain_text(self.system)
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m.role, "content": m.text()} for m in self.messages]
