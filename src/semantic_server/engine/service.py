"""The asyncio face of the engine: messages in, text deltas and a final outcome out.

It keeps the rules that hold for every request whatever protocol carried it: one request
per agent at a time (its cache is in use), admission through the gate (so a request runs
entirely on one model), tokenization off the event loop, stop strings cut out of the text,
and a job removed from the batch the moment its consumer goes away.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError

from semantic_server.engine.batch_engine import (
    BatchEngine,
    Failed,
    Finished,
    Job,
    SamplingParams,
    Started,
    TokenOut,
)
from semantic_server.engine.gate import AdmissionGate
from semantic_server.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelNotLoaded,
)


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()


@dataclass
class Outcome:
    """How a request ended, for the usage block and the logs."""

    model_id: str
    finish_reason: str = "stop"
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_seconds: float | None = None
    started: float = field(default_factory=time.perf_counter)


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that may start one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.matched: str | None = None

    def feed(self, segment: str) -> str:
        """Text that is safe to send now."""
        if self.stopped:
            return ""
        self.text += segment
        hits = [(i, s) for s in self.stops
                if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0]
        if hits:
            self.stopped = True
            index, self.matched = min(hits)
            return self._send_to(index)
        hold = max((k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])), default=0)
        return self._send_to(len(self.text) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send_to(len(self.text))

    def _send_to(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class _AgentLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` through the model's chat template."""
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except (ValueError, TypeError, TemplateError) as exc:  # no template, or it refused these
        raise InvalidRequest(f"the loaded model cannot format these messages: {exc}") from exc


class GenerationService:
    def __init__(self, engine: BatchEngine, gate: AdmissionGate, max_context_tokens: int) -> None:
        self.engine = engine
        self.gate = gate
        self.max_context_tokens = max_context_tokens
        self._agent_locks: dict[str, _AgentLock] = {}
        self._ids = itertools.count()

    def _context_limit(self, config: dict[str, Any]) -> int:
        model_limit = config.get("max_position_embeddings") or self.max_context_tokens
        return min(self.max_context_tokens, int(model_limit))

    async def generate(self, agent_id: str | None, messages: list[dict[str, str]],
                       params: GenerationParams, model_id: str | None = None,
                       ) -> AsyncIterator[str | Outcome]:
        """Text deltas, then one Outcome. Closing the iterator early cancels the job.

        ``model_id``, when the request named one, must be the model loaded once the request
        is admitted: a request held through a swap never runs on a model it did not name.
        """
        if agent_id is None:
            async with self.gate.admit(), \
                    aclosing(self._run(agent_id, messages, params, model_id)) as run:
                async for item in run:
                    yield item
            return
        # One request per agent: the lock lives while anyone holds or waits for it.
        users = self._agent_locks.setdefault(agent_id, _AgentLock())
        users.count += 1
        try:
            async with users.lock, self.gate.admit(), \
                    aclosing(self._run(agent_id, messages, params, model_id)) as run:
                async for item in run:
                    yield item
        finally:
            users.count -= 1
            if users.count == 0:
                self._agent_locks.pop(agent_id, None)

    async def _run(self, agent_id: str | None, messages: list[dict[str, str]],
                   params: GenerationParams, model_id: str | None,
                   ) -> AsyncIterator[str | Outcome]:
        loaded = self.engine.loaded
        if loaded is None:
            raise GenerationFailed("no model is loaded")
        if model_id is not None and model_id != loaded.model_id:
            raise ModelNotLoaded(f"model {model_id!r} is available but not loaded (loaded: "
                                 f"{loaded.model_id}); swap to it first")
        prompt = await asyncio.to_thread(render_prompt, loaded.tokenizer, messages)
        limit = self._context_limit(loaded.config)
        if len(prompt) >= limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens; this model's context is {limit} tokens")
        outcome = Outcome(loaded.model_id, prompt_tokens=len(prompt))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        request_id = f"req-{next(self._ids)}"
        self.engine.submit(Job(
            request_id, agent_id, prompt, min(params.max_tokens, limit - len(prompt)),
            params.sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)))
        detokenizer = loaded.tokenizer.detokenizer
        stops = StopStrings(params.stop)
        ended = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Started):
                    outcome.cached_tokens = event.cached_tokens
                elif isinstance(event, TokenOut):
                    if outcome.ttft_seconds is None:
                        outcome.ttft_seconds = time.perf_counter() - outcome.started
                    outcome.completion_tokens += 1
                    detokenizer.add_token(event.token)
                    if text := stops.feed(detokenizer.last_segment):
                        yield text
                    if stops.stopped:
                        self.engine.cancel(request_id)
                elif isinstance(event, Finished):
                    ended = True
                    detokenizer.finalize()
                    if text := stops.feed(detokenizer.last_segment) + stops.flush():
                        yield text
                    outcome.finish_reason = "stop" if stops.stopped else event.reason
                    outcome.stop_sequence = stops.matched
                    yield outcome
                    return
                elif isinstance(event, Failed):
                    ended = True
                    raise GenerationFailed("generation failed") from event.error
        finally:
            if not ended:
                self.engine.cancel(request_id)
