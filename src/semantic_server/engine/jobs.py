"""What the engine thread is asked to run and what it says back: the typed messages that
cross between the asyncio side and the engine thread.

A job goes in through ``BatchEngine.submit``; its ``emit`` callback receives exactly one
``Started`` (or a ``Failed``), then ``TokenOut`` events, then one ``Finished`` or
``Failed``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from semantic_server.request_outcome import FinishReason


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Started:
    """The job is in the batch; ``cached_tokens`` of its prompt came from a cache."""

    cached_tokens: int


@dataclass(frozen=True)
class TokenOut:
    token: int
    logprob: float | None = None  # when the job asked for log-probabilities
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this step


@dataclass(frozen=True)
class Finished:
    reason: FinishReason


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Started | TokenOut | Finished | Failed


@dataclass
class Job:
    request_id: str
    agent_id: str | None  # None: anonymous, served from the shared prefix cache
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[Event], None]
    namespace: str | None = None  # the tenant whose anonymous prefix cache it may use
    logits_processor: Callable[[Any, Any], Any] | None = None  # a grammar, say
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and top k
    model: Any = None  # the LoadedModel (version) it was admitted to, and runs on to its end
    adapter: Any = None  # the Adapter it was admitted with (None: the base model), to its end
