"""The asyncio face of the engine: messages in, text deltas and a final outcome out.

It keeps the rules that hold for every request whatever protocol carried it: the model a
request names must exist (404 at once) and be resident (serving, or loaded beside) when it
is admitted, one request per agent at a time (its cache is in use), admission through the
gate and a pin on the version serving its model (so a request runs entirely on one model,
even when a zero-downtime swap promotes another meanwhile), tokenization off the event loop, stop
strings cut out of the text, a job removed from the batch the moment its consumer goes
away, and every finished request counted and logged.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from jinja2.exceptions import TemplateError

from semantic_server.agent_ids import hash_agent
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.constraints import GrammarProcessor, check_grammar
from semantic_server.engine.gate import AdmissionGate
from semantic_server.engine.jobs import (
    Failed,
    Finished,
    Job,
    SamplingParams,
    Started,
    TokenOut,
)
from semantic_server.engine.versions import ModelVersions
from semantic_server.errors import (
    AgentBusy,
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    ModelNotLoaded,
    QueueFull,
    SemanticServerError,
    ServerBusy,
    ServiceDegraded,
)
from semantic_server.models.adapters import Adapter, AdapterCatalog
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.lora import check_adapter
from semantic_server.request_outcome import FinishReason, Outcome

if TYPE_CHECKING:
    from semantic_server.observer import Observer


class Residency(Protocol):
    """What the service needs of load on demand (swap/residency.py, above the engine)."""

    async def ensure(self, model_id: str) -> None: ...

    def touch(self, model_id: str) -> None: ...

    def release(self, model_id: str, keep_alive: float | None) -> None: ...

log = logging.getLogger(__name__)

FALLBACK_CONTEXT_TOKENS = 8192  # a model whose config names no context, with no cap set
LOAD_ATTEMPTS = 3  # how often a request brings its model back before a 503
LEASE_POLL_SECONDS = 0.05  # how often a turn asks again for a lease another server holds


@dataclass(frozen=True)
class Grammar:
    """What the output must match (an llguidance grammar), and the request field it came
    from, named in the 400 when it cannot be compiled."""

    text: str
    param: str


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    logprobs: int | None = None  # None: none; k: each token's and the top k (0-20)
    # How long the model stays loaded after this request (seconds; negative: for good;
    # None: the server's default): Ollama's keep_alive, for models loaded beside.
    keep_alive: float | None = None


# What a request asks to continue: chat messages (rendered by the model's chat template),
# a plain text, or token ids.
Prompt = list[dict[str, Any]] | str | list[int]


@dataclass(frozen=True)
class Rendered:
    """A prompt made for the model a request runs on: its messages (or text, or ids), the
    chat template's extra arguments, the grammar its answer must follow, and what the
    caller needs to read that answer (returned in ``Admitted.context``)."""

    prompt: Prompt
    template_args: dict[str, Any] = field(default_factory=dict)
    grammar: Grammar | None = None
    context: Any = None


# A prompt that depends on the model (tools take each template's own format): called with
# the admitted model's tokenizer, off the event loop.
Renderer = Callable[[Any], Rendered]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives; yielded
    before the text the token adds, when the request asked for log-probabilities."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Admitted:
    """The first item of every generation: the request is in the batch on ``model_id``,
    with ``cached_tokens`` of its ``prompt_tokens`` taken from a cache."""

    model_id: str
    prompt_tokens: int
    cached_tokens: int
    context: Any = None  # what a Renderer returned for the caller


def _failure_table(stop: str) -> list[int]:
    """KMP failure function: for each prefix of ``stop``, its longest proper border."""
    table = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table


def _partial_match(stop: str, table: list[int], text: str) -> int:
    """Length of the longest prefix of ``stop`` that ``text`` ends with (``text`` holds no
    whole ``stop``): one pass over at most ``len(stop) - 1`` characters."""
    k = 0
    for char in text[-(len(stop) - 1):] if len(stop) > 1 else "":
        while k and char != stop[k]:
            k = table[k - 1]
        if char == stop[k]:
            k += 1
    return k


class StopStrings:
    """Cuts the text at the first stop string, holding back a tail that may start one.

    Only the unsent text is kept, and it never grows past the longest stop string plus
    the newest segment, so each token costs time linear in the stop strings' length.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._tables = [_failure_table(s) for s in self.stops]
        self.pending = ""  # text not sent yet
        self.stopped = False
        self.matched: str | None = None

    def feed(self, segment: str) -> str:
        """Text that is safe to send now."""
        if self.stopped:
            return ""
        self.pending += segment
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            self.stopped = True
            index, self.matched = min(hits)
            return self._send(index)
        hold = max((_partial_match(s, table, self.pending)
                    for s, table in zip(self.stops, self._tables, strict=True)), default=0)
        return self._send(len(self.pending) - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._send(len(self.pending))

    def _send(self, end: int) -> str:
        out, self.pending = self.pending[:end], self.pending[end:]
        if self.stopped:
            self.pending = ""
        return out


@dataclass
class _AgentLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    count: int = 0


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], **template_args: Any,
                  ) -> list[int]:
    """Token ids of ``messages`` through the model's chat template."""
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  **template_args))
    except (ValueError, TypeError, TemplateError) as exc:  # no template, or it refused these
        raise InvalidRequest(f"the loaded model cannot format these messages: {exc}") from exc


def tokenize(tokenizer: Any, prompt: Prompt, vocab_size: int,
             template_args: dict[str, Any] | None = None) -> list[int]:
    """The token ids of any kind of prompt; an empty one or an unknown id is a 400. So is
    text the tokenizer refuses, on every API, naming the field: a lone surrogate (JSON's
    ``\\ud800`` escape makes one; it is no Unicode text, and the Rust tokenizers raise a
    TypeError on it) is found before the tokenizer sees it."""

    def refuse_surrogates(value: Any, param: str) -> None:
        stack = [value]  # iterative: a deeply nested tool schema cannot exhaust the stack
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                if not item.isascii():
                    try:
                        item.encode()
                    except UnicodeEncodeError as exc:
                        raise InvalidRequest(
                            f"{param} holds a lone surrogate (U+{ord(item[exc.start]):04X}): "
                            "not Unicode text, so it cannot be tokenized", param=param) from None
            elif isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)

    if isinstance(prompt, str):
        refuse_surrogates(prompt, "prompt")
        try:
            ids = list(tokenizer.encode(prompt))
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"the prompt cannot be tokenized: {exc}",
                                 param="prompt") from exc
    elif prompt and all(isinstance(item, int) for item in prompt):
        if not all(0 <= item < vocab_size for item in prompt):
            raise InvalidRequest(f"token ids must be in 0..{vocab_size - 1}", param="prompt")
        ids = list(prompt)
    else:
        refuse_surrogates(prompt, "messages")
        refuse_surrogates(template_args, "tools")
        try:
            ids = render_prompt(tokenizer, prompt, **(template_args or {}))
        except InvalidRequest as exc:  # the template or the tokenizer refused the messages
            exc.param = exc.param or "messages"
            raise
    if not ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    return ids


def grammar_processor(loaded: Any, grammar: Grammar) -> GrammarProcessor:
    """A fresh matcher for one request (compiling a grammar takes milliseconds to tens of
    them: off the event loop); a grammar that does not compile is a 400 naming its field."""
    check_grammar(grammar.text, loaded.tokenizer, grammar.param)
    return GrammarProcessor(loaded.tokenizer, grammar.text, vocab_size(loaded))


def vocab_size(loaded: Any) -> int:
    """The size of the model's logits (what a grammar mask and token ids must fit)."""
    config = {**loaded.config.get("text_config", {}), **loaded.config}
    return int(config.get("vocab_size") or len(loaded.tokenizer.vocab))


async def acquire_within(lock: asyncio.Lock, timeout: float) -> bool:
    """Acquire ``lock`` unless ``timeout`` passes first. Never leaves the lock taken when
    it gives up or is cancelled (``asyncio.wait_for`` can, on Python 3.11, when the lock
    comes free just as the time runs out)."""
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        await asyncio.wait([acquiring], timeout=timeout)
    except BaseException:  # cancelled while waiting
        if acquiring.done() and not acquiring.cancelled():
            lock.release()
        acquiring.cancel()
        raise
    if not acquiring.done():
        acquiring.cancel()
        await asyncio.wait([acquiring])  # cancelled, or acquired just before: either is fine
    return not acquiring.cancelled()


ENGINE_STOPPED_PUBLIC = "the engine stopped; the server must be restarted"


def token_logprob(tokenizer: Any, event: TokenOut) -> TokenLogprob:
    return TokenLogprob(tokenizer.decode([event.token]), event.logprob or 0.0,
                        tuple((tokenizer.decode([t]), lp) for t, lp in event.top))


class GenerationService:
    def __init__(self, engine: BatchEngine, gate: AdmissionGate, versions: ModelVersions,
                 catalog: ModelCatalog, observer: Observer, max_context_tokens: int | None,
                 max_queued: int = 64, adapters: AdapterCatalog | None = None,
                 residency: Residency | None = None, load_on_demand: bool = False,
                 lease_seconds: float = 30.0) -> None:
        """``residency``, when given, hears when requests start and end on a model (for
        keep-alive and recency) and, with ``load_on_demand``, loads the models they name."""
        self.engine = engine
        self.gate = gate
        self.versions = versions
        self.catalog = catalog
        self.adapters = adapters
        self.residency = residency
        self.load_on_demand = load_on_demand
        self.lease_seconds = lease_seconds  # with a shared store: an agent lease's life
        self._hand_backs: set[asyncio.Task] = set()  # leases freed once written back
        self.observer = observer
        self.max_context_tokens = max_context_tokens
        self.max_queued = max_queued
        self.queued = 0  # submitted to the engine, not yet started there
        self._agent_locks: dict[str, _AgentLock] = {}
        self._ids = itertools.count()

    @property
    def waiting(self) -> int:
        """Requests that wait: held by a swap or an agent's lock, or queued in the engine."""
        return self.gate.held + self.queued

    def _check_capacity(self) -> None:
        """Refuse at once what cannot run: a stopped engine, a full waiting line."""
        if self.engine.failure is not None:
            raise ServiceDegraded(ENGINE_STOPPED_PUBLIC)
        if self.waiting >= self.max_queued:
            raise QueueFull(f"{self.waiting} requests are already waiting; retry shortly",
                            retry_after=1)

    @asynccontextmanager
    async def _lease(self, agent_id: str) -> AsyncIterator[None]:
        """With a shared store, hold the agent's lease for the turn, so no other server
        runs it meanwhile: wait for another turn to end (within the hold), then 409
        ``agent_busy``. Without Redis to ask, the turn runs (the README says so).

        The lease outlives the response: a task of its own waits until the turn's cache
        is in the shared store and only then frees it, so the next server to take the
        agent finds the newest cache, and neither the client's last byte nor a cancelled
        request (a client that left) changes that."""
        shared = self.engine.store.shared
        if shared is None:
            yield
            return
        token = shared.turn_token()
        deadline = time.monotonic() + self.gate.hold_seconds
        while (taken := await self._acquire(agent_id, token)) is False:
            if time.monotonic() >= deadline:
                raise AgentBusy("another turn of this agent is running (on this server or "
                                "another); retry when it ends",
                                retry_after=max(1, round(self.gate.hold_seconds)))
            await asyncio.sleep(LEASE_POLL_SECONDS)  # polling Redis, with a deadline
        if not taken:  # Redis cannot say
            yield
            return
        renewal = asyncio.create_task(self._renew(agent_id, token))
        try:
            yield
        finally:
            task = asyncio.create_task(self._hand_back(agent_id, token, renewal))
            self._hand_backs.add(task)
            task.add_done_callback(self._hand_backs.discard)

    async def _acquire(self, agent_id: str, token: str) -> bool | None:
        """One try at the lease; a request cancelled meanwhile frees what it took."""
        shared = self.engine.store.shared
        assert shared is not None
        attempt = asyncio.ensure_future(
            asyncio.to_thread(shared.acquire, agent_id, token, self.lease_seconds))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(lambda done: done.cancelled() or not done.result() or (
                asyncio.ensure_future(asyncio.to_thread(shared.release, agent_id, token))))
            raise

    async def _renew(self, agent_id: str, token: str) -> None:
        shared = self.engine.store.shared
        assert shared is not None
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await asyncio.to_thread(shared.renew, agent_id, token, self.lease_seconds)

    async def _hand_back(self, agent_id: str, token: str, renewal: asyncio.Task) -> None:
        """Wait until the turn's cache is in the shared store (within the hold), then free
        the lease (renewed until then)."""
        store = self.engine.store
        assert store.shared is not None
        try:
            # on the engine thread: after the turn's cache went back (a job cut by a stop
            # string is cancelled after its last token was sent)
            number = await self.engine.on_thread(lambda: store.written_back.pop(agent_id, None))
            deadline = time.monotonic() + self.gate.hold_seconds
            while (number is not None and store.writer is not None
                   and not store.writer.finished(number)):
                if time.monotonic() >= deadline:
                    log.warning("an agent's cache was not written back within %.0f s",
                                self.gate.hold_seconds)
                    break
                await asyncio.sleep(LEASE_POLL_SECONDS)  # the writer's progress, bounded
        except Exception:  # the lease goes back whatever happened to the write
            log.exception("waiting for an agent's write-back failed")
        finally:
            renewal.cancel()
            await asyncio.to_thread(store.shared.release, agent_id, token)

    async def _agent_turn(self, users: _AgentLock) -> None:
        """Wait for the agent's previous request to end: a held request, within the hold.
        Only a request that is the agent's only one takes the lock at once (another may be
        about to take it: the lock's next owner is woken but has not run yet)."""
        if not users.lock.locked() and users.count == 1:
            await users.lock.acquire()
            return
        self.gate.held += 1
        try:
            acquired = await acquire_within(users.lock, self.gate.hold_seconds)
        finally:
            self.gate.held -= 1
        if not acquired:
            raise AgentBusy("another request of this agent is still running; retry when it "
                            "ends", retry_after=max(1, round(self.gate.hold_seconds)))

    def context_limit(self, config: dict[str, Any]) -> int:
        """A model's context: its own, capped by SEMANTIC_MAX_CONTEXT_TOKENS when set (a
        model whose config names none gets the cap, or 8,192)."""
        own = config.get("max_position_embeddings") or (
            config.get("text_config") or {}).get("max_position_embeddings")
        limits = [int(n) for n in (own, self.max_context_tokens) if n]
        return min(limits) if limits else FALLBACK_CONTEXT_TOKENS

    def _check_exists(self, model_id: str | None) -> None:
        """A 404 for a model no swap could load, before the request waits for anything.

        Whether the named model is the loaded one is decided once the request is admitted:
        a request held through a swap is judged against the model it will run on.
        """
        if model_id is None or self.versions.resident(model_id) is not None:
            return  # the common case, without listing the catalog's folders on the event loop
        if not any(entry.model_id == model_id for entry in self.catalog.available()):
            raise ModelNotFound(f"model {model_id!r} does not exist")

    async def _named_adapter(self, model_id: str | None) -> tuple[str | None, Adapter | None]:
        """The model and adapter a request's ``model`` names: ``base:adapter`` names one of
        the base's adapters (404 unknown, 422 unusable, read off the event loop)."""
        if model_id is None or ":" not in model_id:
            return model_id, None
        base, _, name = model_id.partition(":")
        if self.adapters is None:
            raise ModelNotFound(f"model {model_id!r} does not exist: adapters are off")
        return base, await asyncio.to_thread(self.adapters.resolve, name)

    def _adapter_for(self, loaded: Any, named: Adapter | None) -> Adapter | None:
        """The adapter a request admitted to ``loaded`` runs with: the one it named (if
        the model's prepared layers can take it), else the model's current adapter."""
        if named is None:
            return self.versions.adapter_of(loaded)
        check_adapter(getattr(loaded, "lora", None), named, loaded.model_id)
        return named

    async def generate(self, agent_id: str | None, prompt: Prompt | Renderer,
                       params: GenerationParams, model_id: str | None = None,
                       request_id: str | None = None, tenant: str | None = None,
                       ) -> AsyncIterator[Admitted | str | TokenLogprob | Outcome]:
        """One ``Admitted``, text deltas (each preceded by its tokens' ``TokenLogprob`` when
        asked for), then one ``Outcome``. Closing the iterator early cancels the job.
        Refusals (unknown model, busy, too long, a grammar that does not compile) raise
        before ``Admitted``.

        ``model_id``, when the request named one, must be resident (serving, or loaded
        beside) once the request is admitted: a request held through a swap never runs on
        a model it did not name.
        ``request_id`` labels the request's log line; ``tenant`` keeps an anonymous
        request to its own tenant's prefix cache.
        """
        if params.keep_alive is not None and not self.load_on_demand:
            raise InvalidRequest("keep_alive needs SEMANTIC_LOAD_ON_DEMAND=true: without it, "
                                 "models change only through the admin API",
                                 param="keep_alive")
        model_id, adapter = await self._named_adapter(model_id)
        self._check_exists(model_id)
        self._check_capacity()
        run = self._admitted(
            lambda: self._run(agent_id, prompt, params, model_id, adapter, request_id, tenant),
            model_id)
        if agent_id is None:
            async with aclosing(run):
                async for item in run:
                    yield item
            return
        # One request per agent: the lock lives while anyone holds or waits for it.
        users = self._agent_locks.setdefault(agent_id, _AgentLock())
        users.count += 1
        try:
            await self._agent_turn(users)
            try:
                async with self._lease(agent_id), aclosing(run):
                    async for item in run:
                        yield item
            finally:
                users.lock.release()
        finally:
            users.count -= 1
            if users.count == 0:
                self._agent_locks.pop(agent_id, None)

    async def count_tokens(self, request: Prompt | Renderer, model_id: str | None = None,
                           ) -> int:
        """How many tokens ``request`` is on the model it names (else the serving one),
        rendered as a generation would render it; nothing runs on the engine."""
        model_id, _ = await self._named_adapter(model_id)
        self._check_exists(model_id)
        async with self.gate.admit():  # held through a swap, which waits for it to end
            with self.versions.pin(model_id) as loaded:
                rendered = (await asyncio.to_thread(request, loaded.tokenizer)
                            if callable(request) else Rendered(request))
                ids = await asyncio.to_thread(tokenize, loaded.tokenizer, rendered.prompt,
                                              vocab_size(loaded), rendered.template_args)
        return len(ids)

    async def _admitted(self, make_run: Callable[[], AsyncIterator[Any]],
                        model_id: str | None) -> AsyncIterator[Any]:
        """The run of ``make_run()``, admitted by the gate.

        With load on demand, the model a request names is brought first; and if it left
        again before the request was admitted (another model's queue made it leave while
        this request waited for its turn or a swap), it is brought back, a few times at
        most, so a request never fails because another model's requests came in between.
        """
        on_demand = self.residency is not None and self.load_on_demand and model_id is not None
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            if on_demand:
                await self.residency.ensure(model_id)
            run = make_run()
            async with self.gate.admit(), aclosing(run):
                try:
                    first = await anext(run)
                except ModelNotLoaded:
                    if not on_demand:
                        raise
                    log.info("model %s left before request admission (attempt %d)",
                             model_id, attempt)
                    continue
                yield first
                async for item in run:
                    yield item
                return
        raise ServerBusy(f"model {model_id!r} kept leaving for other models' requests; "
                         f"retry shortly", retry_after=1)

    async def _run(self, agent_id: str | None, request: Prompt | Renderer,
                   params: GenerationParams, model_id: str | None, named: Adapter | None,
                   request_id: str | None, tenant: str | None,
                   ) -> AsyncIterator[Admitted | str | TokenLogprob | Outcome]:
        """The request, pinned to the model version serving as it starts, and to the adapter
        it named or, if none, the one that model version uses as it starts."""
        with self.versions.pin(model_id) as loaded:
            if self.residency is not None:
                self.residency.touch(loaded.model_id)
            adapter = self._adapter_for(loaded, named)
            run = self._run_on(loaded, adapter, agent_id, request, params, request_id, tenant)
            try:
                async with aclosing(run):
                    async for item in run:
                        yield item
            finally:
                if self.residency is not None:
                    self.residency.release(loaded.model_id, params.keep_alive)

    async def _run_on(self, loaded: Any, adapter: Adapter | None, agent_id: str | None,
                      request: Prompt | Renderer, params: GenerationParams,
                      request_id: str | None, tenant: str | None,
                      ) -> AsyncIterator[Admitted | str | TokenLogprob | Outcome]:
        served = f"{loaded.model_id}:{adapter.name}" if adapter else loaded.model_id
        store = self.engine.store
        if agent_id is not None and store.shared is not None:  # another server's newer copy
            tag = self.engine.tag_for(loaded, adapter)
            if await asyncio.to_thread(store.refresh, tag, agent_id):
                await self.engine.on_thread(lambda: store.drop_hot(tag, agent_id))
        rendered = (await asyncio.to_thread(request, loaded.tokenizer) if callable(request)
                    else Rendered(request, grammar=params.grammar))
        prompt = await asyncio.to_thread(tokenize, loaded.tokenizer, rendered.prompt,
                                         vocab_size(loaded), rendered.template_args)
        limit = self.context_limit(loaded.config)
        if len(prompt) >= limit:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt)} tokens; this model's context is {limit} tokens")
        processor = None
        if rendered.grammar is not None:
            processor = await asyncio.to_thread(grammar_processor, loaded, rendered.grammar)
        outcome = Outcome(served, loaded.tag.fingerprint, prompt_tokens=len(prompt))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job_id = f"job-{next(self._ids)}"
        self.engine.submit(Job(
            job_id, agent_id, prompt, min(params.max_tokens, limit - len(prompt)),
            params.sampling, lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            tenant, processor, params.logprobs, loaded, adapter))
        self.queued += 1
        started = admitted = False
        detokenizer = loaded.tokenizer.detokenizer
        stops = StopStrings(params.stop)
        ended = False
        try:
            while True:
                event = await events.get()
                if not started:  # whatever the first event, the job left the engine's queue
                    started = True
                    self.queued -= 1
                if isinstance(event, Started):
                    admitted = True
                    outcome.cached_tokens = event.cached_tokens
                    yield Admitted(served, len(prompt), event.cached_tokens,
                                   rendered.context)
                elif isinstance(event, TokenOut):
                    if outcome.ttft_seconds is None:
                        outcome.ttft_seconds = time.perf_counter() - outcome.started
                    outcome.completion_tokens += 1
                    if event.logprob is not None:
                        yield token_logprob(loaded.tokenizer, event)
                    detokenizer.add_token(event.token)
                    if text := stops.feed(detokenizer.last_segment):
                        yield text
                    if stops.stopped:
                        self.engine.cancel(job_id)
                elif isinstance(event, Finished):
                    ended = True
                    detokenizer.finalize()
                    if text := stops.feed(detokenizer.last_segment) + stops.flush():
                        yield text
                    outcome.finish_reason = FinishReason.STOP if stops.stopped else event.reason
                    outcome.stop_sequence = stops.matched
                    self._finished(outcome, agent_id, request_id)
                    yield outcome
                    return
                elif isinstance(event, Failed):
                    ended = True
                    if isinstance(event.error, SemanticServerError) and not admitted:
                        raise event.error  # refused before any output: its own status
                    raise GenerationFailed("generation failed") from event.error
        finally:
            if not started:
                self.queued -= 1
            if not ended:
                self.engine.cancel(job_id)

    def _finished(self, outcome: Outcome, agent_id: str | None, request_id: str | None) -> None:
        """Count the request and log one line for it."""
        outcome.seconds = time.perf_counter() - outcome.started
        self.observer.request_finished(outcome)
        log.info("request", extra={"fields": {
            "request_id": request_id, "agent": hash_agent(agent_id),
            "model": outcome.model_id, "prompt_tokens": outcome.prompt_tokens,
            "cached_tokens": outcome.cached_tokens,
            "generated_tokens": outcome.completion_tokens,
            "ttft_s": round(outcome.ttft_seconds, 4) if outcome.ttft_seconds else None,
            "seconds": round(outcome.seconds, 4), "finish_reason": outcome.finish_reason,
            "status": 200}})
