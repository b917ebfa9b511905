"""BatchEngine: the one thread that runs MLX.

Every MLX call of the server happens here: prefill and decode through mlx-lm's
``BatchGenerator`` (continuous batching: requests join and leave between steps), and,
through :meth:`BatchEngine.call`, the swap's load and unload. The asyncio side talks to it
only through a thread-safe command queue, and hears back through each job's ``emit``
callback, which the HTTP layer wires to ``loop.call_soon_threadsafe``.

A job's prompt is matched against its agent's cache (the longest common prefix is kept,
trimmed where the cache allows, else the cache is dropped), so a turn prefills only the
tokens the agent's cache does not already hold. When a job ends its grown cache goes back
to the AgentCacheStore; anonymous jobs share mlx-lm's LRU prefix cache instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_p

from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.cache_file import AgentCache
from semantic_server.engine.jobs import (
    Event,
    Failed,
    Finished,
    FinishReason,
    Job,
    SamplingParams,
    Started,
    TokenOut,
)
from semantic_server.models.registry import LoadedModel

log = logging.getLogger(__name__)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many cached tokens a prompt reuses: their common prefix, but never the whole
    prompt (the generator needs at least one new token to compute the next logits)."""
    return min(common_prefix(cached, prompt), len(prompt) - 1)


def fit_cache(layers: list[Any], tokens: list[int], prompt: list[int],
              ) -> tuple[list[Any] | None, int]:
    """``layers`` (holding ``tokens``) cut to what ``prompt`` reuses, and how many tokens
    that is; (None, 0) when nothing is reusable or the surplus cannot be trimmed."""
    keep = reusable_prefix(tokens, prompt)
    surplus = len(tokens) - keep
    if keep == 0 or (surplus and not can_trim_prompt_cache(layers)):
        return None, 0
    if surplus:
        trim_prompt_cache(layers, surplus)
    return layers, keep


def batch_generator(loaded: LoadedModel, max_batch: int, prefill_step_size: int,
                    ) -> BatchGenerator:
    """mlx-lm's continuous-batching generator over ``loaded``, stopping at its EOS tokens."""
    return BatchGenerator(
        loaded.model,
        stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)],
        completion_batch_size=max_batch,
        prefill_batch_size=min(8, max_batch),
        prefill_step_size=prefill_step_size,
    )


GeneratorFactory = Callable[[LoadedModel, int, int], Any]


def materialize(cache: list[Any]) -> None:
    """Evaluate a cache taken out of the batch: until then its arrays are lazy slices that
    keep the whole batch's buffers alive, outside any budget."""
    mx.eval([layer.state for layer in cache])


def token_out(job: Job, response: Any) -> TokenOut:
    """The event of one generated token, with its log-probability and the top ones when
    the job asked for them (read off the step's log-probabilities, on the engine thread)."""
    if job.logprobs is None:
        return TokenOut(response.token)
    logprobs = response.logprobs
    top: tuple[tuple[int, float], ...] = ()
    if job.logprobs > 0:
        ids = mx.argpartition(-logprobs, job.logprobs - 1)[: job.logprobs]
        values = logprobs[ids]
        # a grammar's masked tokens have -inf: they are not alternatives, and not JSON
        top = tuple(sorted(((token, value) for token, value in zip(
            ids.tolist(), values.tolist(), strict=True) if math.isfinite(value)),
            key=lambda pair: -pair[1]))
    return TokenOut(response.token, logprobs[response.token].item(), top)


def _make_sampler(params: SamplingParams) -> Callable[[mx.array], mx.array] | None:
    """A per-job sampler with its own random key, so a seed reproduces its text whatever
    else shares the batch. None means greedy (the generator's shared default)."""
    if params.temperature <= 0:
        return None
    key = mx.random.key(params.seed if params.seed is not None else time.time_ns() % 2**63)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if 0 < params.top_p < 1:
            logprobs = apply_top_p(logprobs, params.top_p)
        return mx.random.categorical(logprobs * (1 / params.temperature), key=sub)

    return sample


SHARED_PREFIX = "\0shared-prefix"  # the prefix cache's reservation (no job id looks like it)


class EngineStopped(RuntimeError):
    """The engine thread is gone: nothing can run until the process restarts."""


class BatchEngine:
    """Owns the loaded model's BatchGenerator and every KV array, on its own thread.

    Jobs wait in the engine's own queue until a batch slot is free and the KV budget has
    room for their prompt plus max_tokens beside the jobs already running; a job's
    reservation is released when it ends, so resident KV stays within the budget (a lone
    job larger than the whole budget still runs, alone).
    """

    def __init__(self, store: AgentCacheStore, *, max_batch: int = 16,
                 prefill_step_size: int = 512, shared_prefix_entries: int = 8,
                 shared_prefix_bytes: int = 1 << 63,
                 make_generator: GeneratorFactory = batch_generator) -> None:
        """``make_generator`` builds the generator for a model; tests give one that computes
        no model (the engine's own logic is what they test)."""
        self.store = store
        self.make_generator = make_generator
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self._shared_limits = (shared_prefix_entries, shared_prefix_bytes)
        self._shared = LRUPromptCache(*self._shared_limits)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._loaded: LoadedModel | None = None
        self._generator: BatchGenerator | None = None
        self._pending: deque[Job] = deque()  # submitted, waiting for a slot and KV room
        self._jobs: dict[int, Job] = {}  # generator uid -> running job
        self._uids: dict[str, int] = {}  # request id -> generator uid
        # uid -> the cache at the end of the job's prompt (see AgentCache.checkpoint)
        self._checkpoints: dict[int, tuple[list[Any], list[int]] | None] = {}
        self._stopping = False
        self.failure: str | None = None  # why the engine thread stopped, if it did

    # ---- thread-safe API -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps; its result comes in the future."""
        future: Future = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self.failure is not None:
                future.set_exception(EngineStopped(self.failure))
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, not swallowed
                future.set_exception(exc)

        if self.failure is not None:
            future.set_exception(EngineStopped(self.failure))
        else:
            self._commands.put(command)
        return future

    async def on_thread(self, fn: Callable[[], Any]) -> Any:
        """Await ``fn`` run on the engine thread: how asyncio code touches MLX or the caches
        without blocking the event loop."""
        return await asyncio.wrap_future(self.call(fn))

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            job.emit(Failed(EngineStopped(self.failure)))
            return
        self._commands.put(lambda: self._admit(job))

    def cancel(self, request_id: str) -> None:
        """Remove a job from the batch or the queue at once (its client went away or hit a
        stop string)."""
        self._commands.put(lambda: self._cancel(request_id))

    def shutdown(self) -> None:
        """Stop the thread after failing whatever is still running."""
        self._commands.put(self._stop)
        self._thread.join()

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    @property
    def queued_jobs(self) -> int:
        return len(self._pending)

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    # ---- engine thread ---------------------------------------------------------------
    def attach(self, loaded: LoadedModel) -> None:
        """Serve ``loaded``: a new generator over it (engine thread only)."""
        self._loaded = loaded
        self._generator = self.make_generator(loaded, self.max_batch, self.prefill_step_size)

    def detach(self) -> None:
        """Drop the BatchGenerator and every reference to the model (engine thread only)."""
        if self._jobs or self._pending:
            raise RuntimeError(f"{len(self._jobs) + len(self._pending)} jobs still running")
        if self._generator is not None:
            self._generator.close()
        self._generator = None
        self._loaded = None
        self._shared = LRUPromptCache(*self._shared_limits)
        self.store.unreserve(SHARED_PREFIX)

    def _run(self) -> None:
        try:
            while not self._stopping:
                busy = bool(self._jobs)
                try:
                    self._execute(self._commands.get(block=not busy))
                    while True:  # drain what else arrived before stepping again
                        self._execute(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self._jobs and not self._stopping:
                    self._step()
        except BaseException as exc:  # the thread is dying: say so, fail everyone at once
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("the engine thread stopped", exc_info=exc)
            self._fail_all(EngineStopped(self.failure))
            while not self._stopping:  # answer what still arrives, run nothing
                self._execute(self._commands.get())

    def _execute(self, command: Callable[[], None]) -> None:
        """Run one command; a failing command is logged, never the end of the thread."""
        try:
            command()
        except Exception:
            log.exception("engine command failed")

    def _fail_all(self, error: Exception) -> None:
        for job in [*self._jobs.values(), *self._pending]:
            job.emit(Failed(error))
        self._jobs.clear()
        self._uids.clear()
        self._pending.clear()

    def _stop(self) -> None:
        self._fail_all(RuntimeError("the server is shutting down"))
        self._stopping = True

    def _shared_key(self, job: Job) -> tuple[str, str | None]:
        """Anonymous requests share prefixes per model and tenant, never across tenants."""
        return self._loaded.model_id, job.namespace

    def _take_cache(self, job: Job) -> tuple[list[Any] | None, int]:
        """The job's cache (its agent's, or the shared prefix cache's for an anonymous job)
        cut to what its prompt reuses."""
        if job.agent_id is None:
            layers, rest = self._shared.fetch_nearest_cache(self._shared_key(job), job.prompt)
            tokens = job.prompt[: len(job.prompt) - len(rest)]
            return fit_cache(layers, tokens, job.prompt) if layers is not None else (None, 0)
        entry = self.store.checkout(job.agent_id)
        if entry is None:
            return None, 0
        fitted, keep = fit_cache(entry.layers, entry.tokens, job.prompt)
        if fitted is None and entry.checkpoint is not None:  # a wrapped window: go back to
            fitted, keep = fit_cache(*entry.checkpoint, job.prompt)  # the prompt's end
        return fitted, keep

    def _reservation(self, job: Job, cached: int) -> int:
        """Tokens of KV a job may hold while it runs: its prompt and max_tokens, and its
        prompt once more when it keeps a checkpoint."""
        checkpoint = len(job.prompt) if self._wants_checkpoint(job, cached) else 0
        return len(job.prompt) + job.max_tokens + checkpoint

    def _wants_checkpoint(self, job: Job, cached: int) -> bool:
        """Keep the cache at the prompt's end when this job may wrap a sliding window, so
        a retried turn (or one after a cut reply) can still reuse its prompt."""
        windows = [layer.window for layer in self._loaded.dims.layers if layer.window]
        return (job.agent_id is not None and bool(windows)
                and len(job.prompt) - cached > 1
                and len(job.prompt) + job.max_tokens > min(windows))

    def _admit(self, job: Job) -> None:
        if self.failure is not None:
            job.emit(Failed(EngineStopped(self.failure)))
            return
        if self._generator is None or self._loaded is None:
            job.emit(Failed(RuntimeError("no model is loaded")))
            return
        self._pending.append(job)
        self._schedule()

    def _schedule(self) -> None:
        """Start waiting jobs, in order, while a batch slot is free and the KV budget has
        room for them (a job that fits nowhere runs once nothing else does)."""
        while self._pending and len(self._jobs) < self.max_batch:
            job = self._pending[0]
            if self._jobs and not self.store.fits(self._reservation(job, cached=0)):
                return
            self._pending.popleft()
            self._start(job)

    def _start(self, job: Job) -> None:
        cache, cached = None, 0
        try:
            sampler = _make_sampler(job.sampling)
            cache, cached = self._take_cache(job)  # the agent's own blocks leave the pool
            self.store.reserve(job.request_id, self._reservation(job, cached))
            (uid,) = self._generator.insert(
                [job.prompt[cached:]], max_tokens=[job.max_tokens], caches=[cache],
                all_tokens=[job.prompt[:cached]], samplers=[sampler],
                logits_processors=[[job.logits_processor] if job.logits_processor else []])
        except Exception as exc:  # a bad job must not take the engine or its cache down
            log.exception("could not admit request %s", job.request_id)
            self.store.unreserve(job.request_id)
            if cache is not None:
                self._checkin(job, cache, job.prompt[:cached])
            job.emit(Failed(exc))
            return
        self._jobs[uid] = job
        self._uids[job.request_id] = uid
        if self._wants_checkpoint(job, cached):
            self._checkpoints[uid] = None  # taken when the prompt's first segment ends
        job.emit(Started(cached))

    def _cancel(self, request_id: str) -> None:
        waiting = next((job for job in self._pending if job.request_id == request_id), None)
        if waiting is not None:  # never started: it holds no cache and no reservation
            self._pending.remove(waiting)
            waiting.emit(Finished(FinishReason.CANCELLED))
            return
        uid = self._uids.get(request_id)
        if uid is None or self._generator is None:
            return
        job = self._jobs[uid]
        outcome: Event = Finished(FinishReason.CANCELLED)
        try:
            removed = self._generator.remove([uid], return_prompt_caches=True)
            self.store.unreserve(job.request_id)
            for cache, tokens in removed.values():
                self._checkin(job, cache, tokens, self._checkpoints.get(uid))
        except Exception as exc:  # the job ends either way; its cache may be lost
            log.exception("could not cancel request %s cleanly", request_id)
            outcome = Failed(exc)
        finally:
            self._finish(uid, outcome)
            self._schedule()

    def _finish(self, uid: int, event: Event) -> None:
        job = self._jobs.pop(uid)
        self._uids.pop(job.request_id, None)
        self._checkpoints.pop(uid, None)
        self.store.unreserve(job.request_id)
        job.emit(event)

    def _checkin(self, job: Job, cache: list[Any], tokens: list[int],
                 checkpoint: tuple[list[Any], list[int]] | None = None) -> None:
        tokens = list(tokens)
        if not tokens:  # cancelled before any prefill: nothing worth keeping
            return
        materialize(cache)
        if job.agent_id is None:
            self._shared.insert_cache(self._shared_key(job), tokens, cache)
            room = self.store.room_bytes(SHARED_PREFIX)  # never evicts an agent for it
            if self._shared.nbytes > room:
                self._shared.trim_to(n_bytes=room)
            self.store.reserve_bytes(SHARED_PREFIX, self._shared.nbytes)
        else:
            self.store.checkin(AgentCache(job.agent_id, cache, tokens, checkpoint=checkpoint))

    def _take_checkpoints(self, prompt_responses: list[Any]) -> None:
        """At the end of a prompt's first segment (everything but its last token), copy the
        cache of the jobs that want a checkpoint."""
        due = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt
               and r.uid in self._checkpoints]
        for uid, (cache, tokens) in self._generator.extract_cache(due).items() if due else ():
            materialize(cache)
            self._checkpoints[uid] = (cache, list(tokens))

    def _step(self) -> None:
        try:
            prompt_responses, responses = self._generator.next()
            self._take_checkpoints(prompt_responses)
        except Exception as exc:
            log.exception("generation step failed; failing the batch")
            for uid in list(self._jobs):
                self._finish(uid, Failed(exc))
            self.attach(self._loaded)
            self._schedule()
            return
        for response in responses:
            job = self._jobs.get(response.uid)
            if job is None:
                continue
            try:
                if response.finish_reason is None:
                    job.emit(token_out(job, response))
                    continue
                reason = FinishReason(response.finish_reason)
                if reason is FinishReason.LENGTH:
                    job.emit(token_out(job, response))  # a stop token is not part of the text
                self.store.unreserve(job.request_id)
                self._checkin(job, response.prompt_cache, response.all_tokens,
                              self._checkpoints.get(response.uid))
                self._finish(response.uid, Finished(reason))
            except Exception as exc:  # fail this job only
                log.exception("could not finish request %s", job.request_id)
                if response.uid in self._jobs:
                    self._finish(response.uid, Failed(exc))
        self._schedule()
