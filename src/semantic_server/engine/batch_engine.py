"""BatchEngine: the one thread that runs MLX.

Every MLX call of the server happens here: prefill and decode through mlx-lm's
``BatchGenerator`` (continuous batching: requests join and leave between steps), and,
through :meth:`BatchEngine.call` and :meth:`BatchEngine.call_sliced`, the swap's load,
health check and unload. The asyncio side talks to it only through a thread-safe command
queue, and hears back through each job's ``emit`` callback, which the HTTP layer wires to
``loop.call_soon_threadsafe``.

Each resident model has a *lane*: its own generator, running jobs and anonymous prefix
cache; the thread steps every busy lane in turn. A job runs on the lane of the model
version it was admitted to, so during a zero-downtime swap the old model's requests finish
on the old lane while new ones run on the new. A sliced task (a model loading beside the
serving one) runs one slice between two rounds of steps, so decoding goes on meanwhile.

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
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import apply_top_p

from semantic_server.cache.agent_store import AgentCacheStore, reusable_prefix
from semantic_server.cache.cache_file import AgentCache, CacheTag
from semantic_server.engine.adapter_rows import RoutedModel, with_row, without_row
from semantic_server.engine.adapter_slots import AdapterSlots, SlotLoad
from semantic_server.engine.jobs import (
    Event,
    Failed,
    Finished,
    Job,
    SamplingParams,
    Started,
    TokenOut,
)
from semantic_server.errors import AdapterIncompatible, ModelNotLoaded
from semantic_server.models.adapters import Adapter
from semantic_server.models.registry import LoadedModel
from semantic_server.request_outcome import FinishReason

log = logging.getLogger(__name__)


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


def batch_generator(loaded: LoadedModel, max_batch: int, prefill_step_size: int, *,
                    stop_at_eos: bool = True) -> BatchGenerator:
    """mlx-lm's continuous-batching generator over ``loaded``, stopping at its EOS tokens
    (over its routed form when it has prepared LoRA layers: each row its own adapter).
    ``stop_at_eos=False`` runs every sequence to its max_tokens: for throughput
    measurements whose batches must not shrink at different times."""
    return BatchGenerator(
        RoutedModel(loaded.model, loaded.lora) if loaded.lora else loaded.model,
        stop_tokens=[[t] for t in sorted(loaded.tokenizer.eos_token_ids)] if stop_at_eos
        else None,
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


# How long sliced work (a model loading beside the serving one) may run between two rounds
# of decoding steps: it adds at most this to each token's time while it lasts.
SLICE_SECONDS = 0.05
SHARED_PREFIX = "\0shared-prefix"  # a prefix cache's reservation (no job id looks like it)


class EngineStopped(RuntimeError):
    """The engine thread is gone: nothing can run until the process restarts."""


@dataclass(eq=False)
class Lane:
    """One resident model's batch: its generator, its running jobs (by generator uid), their
    prompt checkpoints (see AgentCache.checkpoint) and its anonymous prefix cache; for a
    model with prepared LoRA layers, its adapter slots and the slot of each job."""

    loaded: LoadedModel
    tag: CacheTag
    generator: Any
    shared: LRUPromptCache
    jobs: dict[int, Job] = field(default_factory=dict)
    checkpoints: dict[int, tuple[list[Any], list[int]] | None] = field(default_factory=dict)
    slots: AdapterSlots | None = None
    rows: dict[int, int] = field(default_factory=dict)  # uid -> adapter slot
    # uid -> when its prefill started and how many tokens it prefills (to its first token)
    prefills: dict[int, tuple[float, int]] = field(default_factory=dict)

    def tag_of(self, job: Job) -> CacheTag:
        """The tag of the caches ``job`` reads and makes: its model's, and its adapter's."""
        return self.tag.with_adapter(job.adapter.key if job.adapter else None)

    def outgoing(self, cache: list[Any]) -> list[Any]:
        """A cache that leaves the generator, without the adapter row it had there."""
        return without_row(cache) if self.slots is not None else cache

    @property
    def shared_key(self) -> tuple[str, int]:
        """The prefix cache's reservation in the KV pool."""
        return SHARED_PREFIX, self.loaded.version


@dataclass
class _Sliced:
    """A task run one slice at a time between engine steps, and where its result goes."""

    slices: Generator[None, None, Any]
    future: Future


class BatchEngine:
    """Owns every resident model's BatchGenerator and every KV array, on its own thread.

    Jobs wait in the engine's own queue until a batch slot is free and the KV budget has
    room for their prompt plus max_tokens beside the jobs already running; a job's
    reservation is released when it ends, so resident KV stays within the budget (a lone
    job larger than the whole budget still runs, alone). ``max_batch`` bounds the jobs
    running on all lanes together.
    """

    def __init__(self, store: AgentCacheStore, *, max_batch: int = 16,
                 prefill_step_size: int = 512, shared_prefix_entries: int = 8,
                 shared_prefix_bytes: int = 1 << 63,
                 make_generator: GeneratorFactory = batch_generator) -> None:
        """``make_generator`` builds the generator for a model; tests give one that computes
        no model (the engine's own logic is what they test)."""
        self.store = store
        if store.writer is not None:  # a finished write: its cache leaves memory at once
            store.writer.on_done = lambda: self._commands.put(store.collect)
        self.make_generator = make_generator
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self._shared_limits = (shared_prefix_entries, shared_prefix_bytes)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self._lanes: dict[LoadedModel, Lane] = {}
        self._pending: deque[Job] = deque()  # submitted, waiting for a slot and KV room
        self._uids: dict[str, tuple[Lane, int]] = {}  # request id -> its lane and uid
        self._sliced: deque[_Sliced] = deque()
        self._stopping = False
        self.failure: str | None = None  # why the engine thread stopped, if it did

    # ---- thread-safe API -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def _enqueue(self, run: Callable[[Future], None]) -> Future:
        """A future that ``run`` settles on the engine thread between two steps, or that
        fails at once with EngineStopped once the thread is gone."""
        future: Future = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            if self.failure is not None:
                future.set_exception(EngineStopped(self.failure))
                return
            run(future)

        if self.failure is not None:
            future.set_exception(EngineStopped(self.failure))
        else:
            self._commands.put(command)
        return future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps; its result comes in the future."""
        def run(future: Future) -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, not swallowed
                future.set_exception(exc)

        return self._enqueue(run)

    async def on_thread(self, fn: Callable[[], Any]) -> Any:
        """Await ``fn`` run on the engine thread: how asyncio code touches MLX or the caches
        without blocking the event loop."""
        return await asyncio.wrap_future(self.call(fn))

    async def sliced(self, make: Callable[[], Generator[None, None, Any]]) -> Any:
        """Await a task the engine thread runs one slice at a time between its steps (each
        ``next`` of the generator ``make`` returns is a slice): long MLX work, such as
        loading a model, that must not stop decoding for the models already serving."""
        future = self._enqueue(lambda f: self._sliced.append(_Sliced(make(), f)))
        return await asyncio.wrap_future(future)

    def submit(self, job: Job) -> None:
        if self.failure is not None:
            job.emit(Failed(EngineStopped(self.failure)))
            return
        self._commands.put(lambda: self._admit(job))

    def cancel_model(self, loaded: LoadedModel) -> int:
        """Engine thread: cancel every job admitted to ``loaded`` (a retiring model whose
        last requests outlast the swap's timeout); returns how many."""
        doomed = [job.request_id for job in self._pending if job.model is loaded]
        lane = self._lanes.get(loaded)
        doomed += [job.request_id for job in lane.jobs.values()] if lane else []
        for request_id in doomed:
            self._cancel(request_id)
        return len(doomed)

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
        return sum(len(lane.jobs) for lane in list(self._lanes.values()))

    @property
    def queued_jobs(self) -> int:
        return len(self._pending)

    # ---- engine thread ---------------------------------------------------------------
    def attach(self, loaded: LoadedModel, tag: CacheTag) -> None:
        """A lane for ``loaded``, whose caches carry ``tag`` (engine thread only)."""
        lora = getattr(loaded, "lora", None)
        self._lanes[loaded] = Lane(
            loaded, tag, self.make_generator(loaded, self.max_batch, self.prefill_step_size),
            LRUPromptCache(*self._shared_limits),
            slots=AdapterSlots(lora.slots, lora.write) if lora is not None else None)

    def tag_for(self, loaded: LoadedModel, adapter: Adapter | None) -> CacheTag:
        """The tag of the caches a request on ``loaded`` with ``adapter`` reads and makes
        (any thread: one lookup)."""
        return self._lanes[loaded].tag.with_adapter(adapter.key if adapter else None)

    def load_adapter(self, loaded: LoadedModel, adapter: Adapter) -> SlotLoad:
        """Copy ``adapter`` into a free slot of ``loaded``'s prepared layers, between two
        steps (engine thread only); the running jobs keep theirs."""
        lane = self._lanes.get(loaded)
        if lane is None:
            raise ModelNotLoaded(f"{loaded.model_id} is no longer loaded")
        if lane.slots is None:
            raise AdapterIncompatible(f"{loaded.model_id} has no prepared adapter layers")
        return lane.slots.load(adapter)

    def detach(self, loaded: LoadedModel) -> None:
        """Drop ``loaded``'s lane, its generator and every reference to the model (engine
        thread only); it must have no job left."""
        lane = self._lanes.get(loaded)
        if lane is None:
            return
        waiting = sum(job.model is loaded for job in self._pending)
        if lane.jobs or waiting:
            raise RuntimeError(f"{len(lane.jobs) + waiting} jobs still run on "
                               f"{loaded.model_id}")
        lane.generator.close()
        self.store.unreserve(lane.shared_key)
        del self._lanes[loaded]

    def _run(self) -> None:
        try:
            while not self._stopping:
                busy = self.active_jobs > 0 or bool(self._sliced)
                try:
                    self._execute(self._commands.get(block=not busy))
                    while True:  # drain what else arrived before stepping again
                        self._execute(self._commands.get_nowait())
                except queue.Empty:
                    pass
                if self._sliced and not self._stopping:
                    self._run_slice()
                self._step_lanes()
        except BaseException as exc:  # the thread is dying: say so, fail everyone at once
            self.failure = f"{type(exc).__name__}: {exc}"
            log.critical("the engine thread stopped", exc_info=exc)
            self._fail_all(EngineStopped(self.failure))
            while not self._stopping:  # answer what still arrives, run nothing
                self._execute(self._commands.get())

    def _step_lanes(self) -> None:
        """One step of every busy lane. (A method of its own, so that no lane outlives
        this call in a variable of the thread's loop: a detached lane must not keep its
        model's weights alive.)"""
        for lane in list(self._lanes.values()):
            if lane.jobs and not self._stopping:
                self._step(lane)

    def _execute(self, command: Callable[[], None]) -> None:
        """Run one command; a failing command is logged, never the end of the thread."""
        try:
            command()
        except Exception:
            log.exception("engine command failed")

    def _run_slice(self) -> None:
        """Slices of the oldest sliced task for up to ``SLICE_SECONDS`` (then the lanes
        step again); its end (or failure) resolves its future."""
        task = self._sliced[0]
        deadline = time.perf_counter() + SLICE_SECONDS
        try:
            while time.perf_counter() < deadline:
                next(task.slices)
        except StopIteration as done:
            self._sliced.popleft()
            if not task.future.done():  # its waiter may have gone
                task.future.set_result(done.value)
        except Exception as exc:  # handed to the caller, not the end of the thread
            self._sliced.popleft()
            if not task.future.done():
                task.future.set_exception(exc)

    def _fail_all(self, error: Exception) -> None:
        for lane in self._lanes.values():
            for job in lane.jobs.values():
                job.emit(Failed(error))
            lane.jobs.clear()
        for job in self._pending:
            job.emit(Failed(error))
        self._uids.clear()
        self._pending.clear()
        for task in self._sliced:
            if not task.future.done():
                task.future.set_exception(error)
        self._sliced.clear()

    def _stop(self) -> None:
        self._fail_all(RuntimeError("the server is shutting down"))
        self._stopping = True

    @staticmethod
    def _shared_key(lane: Lane, job: Job) -> tuple[str, str | None, str | None]:
        """Anonymous requests share prefixes per model, adapter and tenant, never across
        tenants or adapters."""
        return lane.loaded.model_id, job.namespace, lane.tag_of(job).adapter

    def _take_cache(self, lane: Lane, job: Job) -> tuple[list[Any] | None, int]:
        """The job's cache (its agent's, or the lane's prefix cache's for an anonymous
        job) cut to what its prompt reuses."""
        if job.agent_id is None:
            layers, rest = lane.shared.fetch_nearest_cache(self._shared_key(lane, job),
                                                           job.prompt)
            tokens = job.prompt[: len(job.prompt) - len(rest)]
            seed = self.store.shared_prefix(lane.tag_of(job), job.prompt, job.namespace,
                                            longer_than=len(tokens))
            if seed is not None:  # an agent (or chunks on disk) holds more
                layers, tokens = seed.layers, seed.tokens
            return fit_cache(layers, tokens, job.prompt) if layers is not None else (None, 0)
        entry = self.store.checkout(lane.tag_of(job), job.agent_id, job.prompt)
        if entry is None:
            return None, 0
        fitted, keep = fit_cache(entry.layers, entry.tokens, job.prompt)
        if fitted is None and entry.checkpoint is not None:  # a wrapped window: go back to
            fitted, keep = fit_cache(*entry.checkpoint, job.prompt)  # the prompt's end
        return fitted, keep

    @staticmethod
    def _reservation(lane: Lane, job: Job, cached: int) -> int:
        """Tokens of KV a job may hold while it runs: its prompt and max_tokens, and its
        prompt once more when it keeps a checkpoint."""
        checkpoint = len(job.prompt) if BatchEngine._wants_checkpoint(lane, job, cached) else 0
        return len(job.prompt) + job.max_tokens + checkpoint

    @staticmethod
    def _wants_checkpoint(lane: Lane, job: Job, cached: int) -> bool:
        """Keep the cache at the prompt's end when this job may wrap a sliding window, so
        a retried turn (or one after a cut reply) can still reuse its prompt."""
        windows = [layer.window for layer in lane.loaded.dims.layers if layer.window]
        return (job.agent_id is not None and bool(windows)
                and len(job.prompt) - cached > 1
                and len(job.prompt) + job.max_tokens > min(windows))

    def _admit(self, job: Job) -> None:
        if self.failure is not None:
            job.emit(Failed(EngineStopped(self.failure)))
            return
        if job.model not in self._lanes:
            job.emit(Failed(RuntimeError("its model is not loaded")))
            return
        self._pending.append(job)
        self._schedule()

    def _schedule(self) -> None:
        """Start waiting jobs, in order, while a batch slot is free and the KV budget has
        room for them (a job that fits nowhere runs once nothing else does). A job whose
        adapter finds every adapter slot in use is passed over until one comes free (the
        oldest such job gets it first); the jobs behind it go on."""
        blocked: list[Job] = []  # waiting for an adapter slot, in queue order
        while self._pending and self.active_jobs < self.max_batch:
            job = self._pending.popleft()
            lane = self._lanes.get(job.model)
            if lane is None:  # its model left meanwhile (a failed swap's cleanup)
                job.emit(Failed(RuntimeError("its model is not loaded")))
                continue
            if job.adapter is not None and lane.slots is None:
                job.emit(Failed(AdapterIncompatible(
                    f"{job.model.model_id} has no prepared adapter layers")))
                continue
            if lane.slots is not None and not lane.slots.can_take(job.adapter):
                blocked.append(job)
                continue
            reserve = self._reservation(lane, job, cached=0)
            if self.active_jobs and not self.store.fits(lane.tag, reserve):
                self._pending.appendleft(job)
                break
            self._start(lane, job)
        self._pending.extendleft(reversed(blocked))

    def _start(self, lane: Lane, job: Job) -> None:
        cache, cached, slot = None, 0, None
        try:
            sampler = _make_sampler(job.sampling)
            cache, cached = self._take_cache(lane, job)  # the agent's blocks leave the pool
            self.store.reserve(job.request_id, lane.tag, self._reservation(lane, job, cached))
            inserted = cache
            if lane.slots is not None:  # the sequence carries its adapter slot
                slot = lane.slots.take(job.adapter)
                inserted = with_row(cache if cache is not None
                                    else make_prompt_cache(lane.loaded.model), slot)
            (uid,) = lane.generator.insert(
                [job.prompt[cached:]], max_tokens=[job.max_tokens], caches=[inserted],
                all_tokens=[job.prompt[:cached]], samplers=[sampler],
                logits_processors=[[job.logits_processor] if job.logits_processor else []])
        except Exception as exc:  # a bad job must not take the engine or its cache down
            log.exception("could not admit request %s", job.request_id)
            try:
                if slot is not None and lane.slots is not None:
                    lane.slots.give_back(slot)
                self.store.unreserve(job.request_id)
                if cache is not None:
                    self._checkin(lane, job, cache, job.prompt[:cached])
            except Exception:  # the job is answered whatever happens to its cache
                log.exception("could not put back the cache of request %s", job.request_id)
            job.emit(Failed(exc))
            return
        lane.jobs[uid] = job
        lane.prefills[uid] = (time.perf_counter(), len(job.prompt) - cached)
        if slot is not None:
            lane.rows[uid] = slot
        self._uids[job.request_id] = (lane, uid)
        if self._wants_checkpoint(lane, job, cached):
            lane.checkpoints[uid] = None  # taken when the prompt's first segment ends
        job.emit(Started(cached))

    def _cancel(self, request_id: str) -> None:
        waiting = next((job for job in self._pending if job.request_id == request_id), None)
        if waiting is not None:  # never started: it holds no cache and no reservation
            self._pending.remove(waiting)
            waiting.emit(Finished(FinishReason.CANCELLED))
            return
        if request_id not in self._uids:
            return
        lane, uid = self._uids[request_id]
        job = lane.jobs[uid]
        outcome: Event = Finished(FinishReason.CANCELLED)
        try:
            removed = lane.generator.remove([uid], return_prompt_caches=True)
            self.store.unreserve(job.request_id)
            for cache, tokens in removed.values():
                self._checkin(lane, job, lane.outgoing(cache), tokens,
                              lane.checkpoints.get(uid))
        except Exception as exc:  # the job ends either way; its cache may be lost
            log.exception("could not cancel request %s cleanly", request_id)
            outcome = Failed(exc)
        finally:
            self._finish(lane, uid, outcome)
            self._schedule()

    @staticmethod
    def _remove_quietly(lane: Lane, uid: int) -> None:
        """Take a failed job's row out of the batch (its cache is lost with it), so it
        neither decodes on nor holds a slot that is given back."""
        try:
            lane.generator.remove([uid])
        except Exception:
            log.exception("could not remove a failed row from the batch")

    def _finish(self, lane: Lane, uid: int, event: Event) -> None:
        job = lane.jobs.pop(uid)
        self._uids.pop(job.request_id, None)
        lane.checkpoints.pop(uid, None)
        lane.prefills.pop(uid, None)
        if uid in lane.rows and lane.slots is not None:
            lane.slots.give_back(lane.rows.pop(uid))
        self.store.unreserve(job.request_id)
        job.emit(event)

    def _checkin(self, lane: Lane, job: Job, cache: list[Any], tokens: list[int],
                 checkpoint: tuple[list[Any], list[int]] | None = None) -> None:
        tokens = list(tokens)
        if not tokens:  # cancelled before any prefill: nothing worth keeping
            return
        materialize(cache)
        if job.agent_id is None:
            lane.shared.insert_cache(self._shared_key(lane, job), tokens, cache)
            room = self.store.room_bytes(lane.shared_key)  # never evicts an agent for it
            if lane.shared.nbytes > room:
                lane.shared.trim_to(n_bytes=room)
            self.store.reserve_bytes(lane.shared_key, lane.shared.nbytes)
        else:
            self.store.checkin(AgentCache(job.agent_id, cache, tokens, lane.tag_of(job),
                                          checkpoint))

    @staticmethod
    def _take_checkpoints(lane: Lane, prompt_responses: list[Any]) -> None:
        """At the end of a prompt's first segment (everything but its last token), copy the
        cache of the jobs that want a checkpoint."""
        due = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt
               and r.uid in lane.checkpoints]
        for uid, (cache, tokens) in lane.generator.extract_cache(due).items() if due else ():
            cache = lane.outgoing(cache)
            materialize(cache)
            lane.checkpoints[uid] = (cache, list(tokens))

    def _step(self, lane: Lane) -> None:
        try:
            prompt_responses, responses = lane.generator.next()
            self._take_checkpoints(lane, prompt_responses)
        except Exception as exc:
            log.exception("generation step failed; failing the batch of %s",
                          lane.loaded.model_id)
            for uid in list(lane.jobs):
                self._finish(lane, uid, Failed(exc))
            lane.generator = self.make_generator(lane.loaded, self.max_batch,
                                                 self.prefill_step_size)
            self._schedule()
            return
        for response in responses:
            job = lane.jobs.get(response.uid)
            if job is None:
                continue
            if (prefill := lane.prefills.pop(response.uid, None)) is not None:
                self.store.policy.prefilled(lane.tag.base.digest, prefill[1],
                                            time.perf_counter() - prefill[0])
            try:
                if response.finish_reason is None:
                    job.emit(token_out(job, response))
                    continue
                reason = FinishReason(response.finish_reason)
                if reason is FinishReason.LENGTH:
                    job.emit(token_out(job, response))  # a stop token is not part of the text
                self.store.unreserve(job.request_id)
                self._checkin(lane, job, lane.outgoing(response.prompt_cache),
                              response.all_tokens, lane.checkpoints.get(response.uid))
                self._finish(lane, response.uid, Finished(reason))
            except Exception as exc:  # fail this job only
                log.exception("could not finish request %s", job.request_id)
                if response.uid in lane.jobs:
                    if response.finish_reason is None:  # still in the batch: take it out
                        self._remove_quietly(lane, response.uid)
                    self._finish(lane, response.uid, Failed(exc))
        self._schedule()
