"""ModelSwapOrchestrator: change the serving model without losing any agent's cache.

A preflight checks the target before anything changes (a bad target is refused while the
old model keeps serving) and plans the path by memory (``SwapMode``):

* **dual** (ADR-013), when the target fits beside the serving model in the memory budget:
  load it in slices on the engine thread while the old model keeps decoding, health-check
  it, give it a batch lane and a cache tag, then *promote* it (new requests pin it from
  then on), let requests pinned to the old model finish there (*retire*), write the old
  model's hot caches to disk and unload it. Nobody is held. A failure before the
  promotion unloads the target and the old model never noticed (``rolled_back``).
* **sequential**, when it does not fit: eight timed steps (``SwapStep``): drain, evict,
  shutdown, unload, load, reconfigure, retag, reinit. Requests that arrive meanwhile
  wait at the gate. A drain that times out or caches that cannot be written stop it
  before anything is unloaded (``aborted``); a failure from load onwards rolls back to
  the old model (``rolled_back``, with the rollback's own steps); if the rollback fails
  too the server is ``degraded`` until a later swap succeeds.

Models can also be resident *beside* the serving one (``SwapKind``): ``load`` runs the
dual path up to the promotion, which adds the target as a model that takes the requests
naming it; ``unload`` retires such a model (its last requests finish, its caches go to
disk, its memory comes back). Neither holds anyone. A sequential swap replaces only the
serving model; the models beside stay.

Every step that touches MLX runs on the engine thread. The server's first load at startup
runs the sequential bring-up steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil

from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.cache_file import CacheTag
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.gate import AdmissionGate, ServerState
from semantic_server.engine.versions import ModelVersions, VersionState, log_transition
from semantic_server.errors import (
    ModelInvalid,
    ModelNotLoaded,
    ModelStateConflict,
    ModelTooLarge,
    SwapInProgress,
)
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import dims_from_config
from semantic_server.models.registry import LoadedModel, ModelRegistry
from semantic_server.models.weight_count import weight_count, weight_files
from semantic_server.swap_result import (
    AdapterSwapResult,
    StepTiming,
    SwapKind,
    SwapMode,
    SwapOutcome,
    SwapResult,
    SwapStep,
)

if TYPE_CHECKING:
    from semantic_server.observer import Observer

log = logging.getLogger(__name__)
Phase = Literal["startup", "swap", "rollback"]  # which bring-up a step's log line belongs to
WARM_UP_SHARE = 0.1  # a load's working memory beyond its weights, as a share of them
# while weights are converted: the files' weights and the conversion's intermediates, as a
# share of the files (measured above the converted weights: Gemma 3 270M 1.56x, SmolLM2 0.42x)
CONVERSION_SHARE = 1.5
RETIRE_GRACE_SECONDS = 5.0  # after cutting the old model's last requests, for them to end

# Each path as data: its steps, in order (their names: SwapStep, in swap_result.py).
SEQUENTIAL_STEPS = (SwapStep.DRAIN, SwapStep.EVICT, SwapStep.SHUTDOWN, SwapStep.UNLOAD,
                    SwapStep.LOAD, SwapStep.RECONFIGURE, SwapStep.RETAG, SwapStep.REINIT)
DUAL_STEPS = (SwapStep.LOAD, SwapStep.WARM, SwapStep.RECONFIGURE, SwapStep.RETAG,
              SwapStep.PROMOTE, SwapStep.RETIRE, SwapStep.EVICT, SwapStep.SHUTDOWN,
              SwapStep.UNLOAD)
LOAD_STEPS = (SwapStep.LOAD, SwapStep.WARM, SwapStep.RECONFIGURE, SwapStep.RETAG,
              SwapStep.PROMOTE)
UNLOAD_STEPS = (SwapStep.RETIRE, SwapStep.EVICT, SwapStep.SHUTDOWN, SwapStep.UNLOAD)
# A failure in these steps of the sequential path stops it with nothing changed; after
# them, it rolls back.
ABORTABLE = (SwapStep.DRAIN, SwapStep.EVICT)


@dataclass(frozen=True)
class MemoryPlan:
    """What the preflight weighed: the target's memory against the budget."""

    need_bytes: int  # the target's peak while it loads (see estimated_bytes)
    resident_bytes: int  # the weights of the models resident now
    budget_bytes: int  # SEMANTIC_MEMORY_BUDGET_BYTES
    available_bytes: int  # memory the system has free now
    kept_bytes: int = 0  # of resident_bytes, the models beside, which no swap unloads

    @property
    def fits_beside(self) -> bool:
        """Whether the target can load while the resident models stay."""
        return (self.need_bytes + self.resident_bytes <= self.budget_bytes
                and self.need_bytes <= self.available_bytes)

    @property
    def fits_alone(self) -> bool:
        """Whether the target can load once the serving model is unloaded (the models
        beside it stay)."""
        return (self.need_bytes + self.kept_bytes <= self.budget_bytes
                and self.need_bytes <= self.available_bytes + self.resident_bytes
                - self.kept_bytes)


class _StepFailed(Exception):
    def __init__(self, step: SwapStep, cause: BaseException) -> None:
        super().__init__(f"{step} failed: {cause}")
        self.step = step




def estimated_bytes(path: Path, config: dict[str, Any], compute_bytes: int | None) -> int:
    """The most memory loading the model takes: its weights once converted to the compute
    dtype (``compute_bytes`` a weight, counted from the files' headers; None keeps the
    files' own), a tenth more for the warm-up, and, when they are converted, the files'
    weights and the intermediates of the conversion (``CONVERSION_SHARE`` of the files).
    Measured peaks of a load in float32: Gemma 3 270M 1.55 GB (this gives 1.64), SmolLM2
    135M 0.59 GB (0.77); a whole-file estimate at one bit width gave 2.48 and 0.93.
    A ValueError when a file has no readable header (the load would fail too)."""
    size = sum(f.stat().st_size for f in weight_files(path))
    if compute_bytes is None:
        return int(size * (1 + WARM_UP_SHARE))
    converted = weight_count(path, config.get("quantization")) * compute_bytes
    # files already in the compute dtype are the weights themselves, headers aside
    converts = abs(size - converted) > 0.01 * converted
    return int(converted * (1 + WARM_UP_SHARE) + (size * CONVERSION_SHARE if converts else 0))


class ModelSwapOrchestrator:
    def __init__(self, *, catalog: ModelCatalog, registry: ModelRegistry, engine: BatchEngine,
                 store: AgentCacheStore, gate: AdmissionGate, versions: ModelVersions,
                 observer: Observer, block_tokens: int, memory_budget_bytes: int,
                 history: int = 20) -> None:
        self.catalog = catalog
        self.registry = registry
        self.engine = engine
        self.store = store
        self.gate = gate
        self.versions = versions
        self.observer = observer
        self.block_tokens = block_tokens
        self.memory_budget_bytes = memory_budget_bytes
        # model swaps and adapter swaps (AdapterSwapper adds its own), oldest first
        self.history: deque[SwapResult | AdapterSwapResult] = deque(maxlen=history)
        self.swapping: SwapMode | None = None  # the path of the swap in progress, if any
        self.target: str | None = None  # the model a swap or load in progress brings
        self._running: asyncio.Task | None = None
        self._other: str | None = None  # another kind of swap holding the models (adapters)

    async def idle(self) -> None:
        """Return once no model operation runs (it may be refused again: another may
        start at once)."""
        while self._running is not None:
            await asyncio.wait([self._running])

    @contextmanager
    def exclusive(self, kind: str) -> Iterator[None]:
        """Hold off model swaps while another kind of swap (``kind``: an adapter swap)
        changes a serving model: one swap of any kind at a time, a 409 for the next."""
        if self._running is not None or self._other is not None:
            raise SwapInProgress("another swap is in progress")
        self._other = kind
        try:
            yield
        finally:
            self._other = None

    def _tag(self, loaded: LoadedModel) -> CacheTag:
        return CacheTag.for_model(loaded.tag, self.block_tokens)

    def preflight(self, model_id: str) -> MemoryPlan:
        """Refuse a target that cannot work before anything changes (404 / 422), and
        weigh its memory against the budget."""
        path = self.catalog.resolve(model_id)
        config = self.catalog.read_config(model_id)
        try:
            dims_from_config(config, self.registry.kv_dtype_name(config))
        except ValueError as exc:
            raise ModelInvalid(f"model {model_id!r}: {exc}") from exc
        dtype = self.registry.compute_dtype
        try:
            need = estimated_bytes(path, config, dtype.size if dtype else None)
        except (ValueError, OSError) as exc:
            raise ModelInvalid(f"model {model_id!r}: unreadable weights: {exc}") from exc
        need += self.registry.lora_bytes(model_id)
        beside = [self.versions.resident(m) for m in self.versions.beside]
        plan = MemoryPlan(need,
                          sum(m.weight_bytes for m in self.registry.resident),
                          self.memory_budget_bytes, psutil.virtual_memory().available,
                          sum(m.weight_bytes for m in beside if m is not None))
        if not plan.fits_alone:
            raise ModelTooLarge(
                f"model {model_id!r} needs about {plan.need_bytes / 2**30:.2f} GiB; the memory "
                f"budget is {plan.budget_bytes / 2**30:.2f} GiB and "
                f"{(plan.available_bytes + plan.resident_bytes) / 2**30:.2f} GiB would be free")
        return plan

    def _choose(self, model_id: str, plan: MemoryPlan, mode: SwapMode) -> SwapMode:
        """The path a swap takes: dual when asked for or (auto) when the target fits beside
        the serving model; a dual swap that cannot run is a 422 before anything happens."""
        if mode is SwapMode.SEQUENTIAL:
            return mode
        if self.versions.serving is None:  # nothing serves: nothing to keep serving
            if mode is SwapMode.DUAL:
                raise ModelTooLarge("no model is serving, so there is nothing to load beside: "
                                    "use mode sequential or auto")
            return SwapMode.SEQUENTIAL
        if plan.fits_beside:
            return SwapMode.DUAL
        if mode is SwapMode.DUAL:
            raise ModelTooLarge(
                f"model {model_id!r} needs about {plan.need_bytes / 2**30:.2f} GiB beside "
                f"{plan.resident_bytes / 2**30:.2f} GiB of resident weights; the memory "
                f"budget is {plan.budget_bytes / 2**30:.2f} GiB and "
                f"{plan.available_bytes / 2**30:.2f} GiB is free: use mode sequential or auto")
        return SwapMode.SEQUENTIAL

    async def start(self, model_id: str) -> LoadedModel:
        """The server's first model: the bring-up steps of a swap, with nothing to undo."""
        try:
            return await self._bring_up([], model_id, "startup")
        except _StepFailed as failure:
            raise failure.__cause__ from None

    async def swap(self, model_id: str, timeout_seconds: float = 60.0,
                   mode: SwapMode = SwapMode.AUTO) -> SwapResult:
        """Swap to ``model_id``; every swap that passed its preflight ends in history and
        metrics with its outcome, whatever that is.

        A swap runs in a task of its own: once begun it finishes even if its caller is
        cancelled (an admin client that disconnects), since stopping between two steps
        would leave the server half swapped. One swap at a time: a second is refused.
        """
        return await self._exclusive(lambda: self._swap_once(model_id, timeout_seconds, mode))

    async def load(self, model_id: str, timeout_seconds: float = 60.0) -> SwapResult:
        """Load ``model_id`` beside the resident models (the dual path up to its promotion):
        it then takes the requests that name it. A 409 when it is resident already, a 422
        when it does not fit beside them."""
        return await self._exclusive(lambda: self._load_once(model_id))

    async def unload(self, model_id: str, timeout_seconds: float = 60.0) -> SwapResult:
        """Retire ``model_id``, loaded beside: its requests finish (``timeout_seconds`` at
        most), its caches go to disk, its memory comes back. The serving model is a 409
        (swap to another instead)."""
        return await self._exclusive(lambda: self._unload_once(model_id, timeout_seconds))

    async def _exclusive(self, run: Callable[[], Awaitable[SwapResult]]) -> SwapResult:
        """Run one model operation in a task of its own, the only one at a time; record
        its result (one that is refused before it starts raises instead)."""
        if self._running is not None or self._other is not None:
            raise SwapInProgress("another swap is in progress")
        self._running = asyncio.create_task(self._recorded(run))
        return await asyncio.shield(self._running)

    async def _recorded(self, run: Callable[[], Awaitable[SwapResult]]) -> SwapResult:
        try:
            started = time.perf_counter()
            result = await run()
            result.duration_ms = (time.perf_counter() - started) * 1e3
            self.history.append(result)
            self.observer.swap_finished(result)
            return result
        finally:
            self.swapping = self.target = None
            self._running = None

    async def _swap_once(self, model_id: str, timeout: float, mode: SwapMode) -> SwapResult:
        if model_id in self.versions.beside:
            raise ModelStateConflict(f"model {model_id!r} is loaded beside the serving model: "
                                     f"name it per request, or unload it first")
        # Resolving may read files or download a hub repo: not on the event loop.
        plan = await asyncio.to_thread(self.preflight, model_id)
        self.swapping, self.target = self._choose(model_id, plan, mode), model_id
        old = self.versions.loaded
        result = SwapResult(SwapOutcome.SUCCESS, old.model_id if old else None, model_id,
                            self.swapping)
        result.memory["plan"] = asdict(plan)
        if self.swapping is SwapMode.DUAL:
            await self._dual(result, old, model_id, timeout)
        else:
            await self._sequential(result, old, model_id, timeout)
        return result

    async def _load_once(self, model_id: str) -> SwapResult:
        if self.versions.serving is None:
            raise ModelStateConflict("no model is serving: swap to one first")
        if self.versions.resident(model_id) is not None:
            raise ModelStateConflict(f"model {model_id!r} is loaded already")
        plan = await asyncio.to_thread(self.preflight, model_id)
        if not plan.fits_beside:
            raise ModelTooLarge(
                f"model {model_id!r} needs about {plan.need_bytes / 2**30:.2f} GiB beside "
                f"{plan.resident_bytes / 2**30:.2f} GiB of resident weights; the memory "
                f"budget is {plan.budget_bytes / 2**30:.2f} GiB and "
                f"{plan.available_bytes / 2**30:.2f} GiB is free")
        self.swapping, self.target = SwapMode.DUAL, model_id
        result = SwapResult(SwapOutcome.SUCCESS, None, model_id, SwapMode.DUAL, SwapKind.LOAD)
        result.memory["plan"] = asdict(plan)
        new = await self._load_beside(result, model_id)
        if new is None:
            return result

        async def serve() -> None:
            self.versions.add(new)

        await self._timed(result.steps, SwapStep.PROMOTE, serve)
        result.memory["weights_new"] = new.weight_bytes
        result.message = f"loaded {model_id} beside the resident models; nobody was held"
        return result

    async def _unload_once(self, model_id: str, timeout: float) -> SwapResult:
        loaded = self.versions.resident(model_id)
        if loaded is None:
            raise ModelNotLoaded(f"model {model_id!r} is not loaded")
        if loaded is self.versions.loaded:
            raise ModelStateConflict(f"model {model_id!r} serves the requests that name no "
                                     f"model: swap to another model instead")
        self.swapping = SwapMode.DUAL
        result = SwapResult(SwapOutcome.SUCCESS, model_id, None, SwapMode.DUAL,
                            SwapKind.UNLOAD, message=f"unloaded {model_id}")
        result.memory["weights_old"] = loaded.weight_bytes
        self.versions.remove(model_id)
        try:
            await self._retire(result, loaded, timeout)
        except _StepFailed as failure:
            result.failed_step = failure.step
            result.message += f"; {failure}: {model_id} may still hold memory"
        return result

    async def _timed(self, steps: list[StepTiming], name: SwapStep,
                     step: Callable[[], Awaitable[Any]], phase: Phase = "swap") -> Any:
        started = time.perf_counter()
        try:
            value = await step()
        except Exception as exc:
            steps.append(StepTiming(name, (time.perf_counter() - started) * 1e3, False))
            log.error("swap step failed", extra={"fields": {
                "step": name, "phase": phase, "duration_ms": steps[-1].duration_ms,
                "error": str(exc)}})
            raise _StepFailed(name, exc) from exc
        steps.append(StepTiming(name, (time.perf_counter() - started) * 1e3, True))
        log.info("swap step", extra={"fields": {
            "step": name, "phase": phase, "duration_ms": round(steps[-1].duration_ms, 2)}})
        return value

    async def _engine_step(self, steps: list[StepTiming], name: SwapStep,
                           fn: Callable[[], Any], phase: Phase = "swap") -> Any:
        """A timed step that touches MLX, the pool or the caches: run on the engine thread."""
        return await self._timed(steps, name, lambda: self.engine.on_thread(fn), phase)

    # ---- the dual path ---------------------------------------------------------------
    async def _dual(self, result: SwapResult, old: LoadedModel, model_id: str,
                    timeout: float) -> None:
        """Load beside, promote, retire the old model after its last request, reclaim it."""
        new = await self._load_beside(result, model_id)
        if new is None:
            return
        result.memory["peak_during_load"] = new.stats.after.peak_bytes
        result.memory["weights_old"] = old.weight_bytes
        result.memory["weights_new"] = new.weight_bytes

        async def promote() -> float:
            return self.versions.promote(new)

        result.promotion_pause_ms = await self._timed(result.steps, SwapStep.PROMOTE,
                                                      promote) * 1e3
        result.message = f"swapped {old.model_id} -> {model_id} beside; nobody was held"
        try:
            await self._retire(result, old, timeout)
        except _StepFailed as failure:  # the target serves; the old model may linger
            result.failed_step = failure.step
            result.message += f"; {failure}: {old.model_id} may still hold memory"

    async def _load_beside(self, result: SwapResult, model_id: str) -> LoadedModel | None:
        """Load, warm, reconfigure, retag: ``model_id`` ready beside the resident models,
        which serve on meanwhile. A failure undoes what ran and returns None, the result
        ``rolled_back``."""
        steps = result.steps
        new: LoadedModel | None = None
        undo: list[Callable[[], Any]] = []  # what ran so far, to take back on a failure
        try:
            log_transition(model_id, VersionState.LOADING)

            async def load() -> LoadedModel:
                prepared = await asyncio.to_thread(self.registry.prepare, model_id)
                return await self.engine.sliced(lambda: self.registry.load_slices(prepared))

            new = await self._timed(steps, SwapStep.LOAD, load)
            loaded = new
            undo.append(lambda: self.registry.unload(loaded))
            log_transition(new, VersionState.WARMING)
            await self._timed(steps, SwapStep.WARM, lambda: self.engine.sliced(
                lambda: self.registry.health_check(loaded)))
            await self._engine_step(steps, SwapStep.RECONFIGURE,
                                    lambda: self.engine.attach(loaded, self._tag(loaded)))
            undo.append(lambda: self.engine.detach(loaded))
            await self._engine_step(steps, SwapStep.RETAG,
                                    lambda: self.store.add_model(self._tag(loaded), loaded.dims))
        except _StepFailed as failure:
            result.status, result.failed_step = SwapOutcome.ROLLED_BACK, failure.step
            result.message = f"{failure}; the resident models kept serving throughout"
            try:
                if undo:
                    await self.engine.on_thread(lambda: [step() for step in reversed(undo)])
            except Exception as exc:  # the old model serves on; say what is left behind
                result.message += f"; the target could not be unloaded: {exc}"
            log.warning("swap rolled back", extra={"fields": {"reason": result.message}})
            return None
        return new

    async def _retire(self, result: SwapResult, old: LoadedModel, timeout: float) -> None:
        """After a promotion: wait for the old model's last request (``timeout`` at most:
        then what still runs on it is cancelled), write its hot caches to disk and give its
        memory back. A cache that cannot be written (a full disk) stays hot in memory under
        its tag, never lost."""
        steps = result.steps

        async def retire() -> None:
            waiting = asyncio.ensure_future(self.versions.retire(old))
            try:
                await asyncio.wait_for(asyncio.shield(waiting), timeout)
            except TimeoutError:
                cut = await self.engine.on_thread(lambda: self.engine.cancel_model(old))
                result.message += (f"; {cut} requests still running on {old.model_id} after "
                                   f"{timeout:g} s were cut off")
                await asyncio.wait_for(waiting, RETIRE_GRACE_SECONDS)

        try:
            await self._timed(steps, SwapStep.RETIRE, retire)
        except _StepFailed:  # a request that never lets go: its job is gone, go on
            self.versions.forget(old)
        tag = self._tag(old)
        try:
            evicted = await self._engine_step(steps, SwapStep.EVICT,
                                              lambda: self.store.evict_all(tag))
            result.evicted_agents = len(evicted)
            await self._engine_step(steps, SwapStep.SHUTDOWN, lambda: self._drop_lane(old))
        except _StepFailed as failure:
            result.message += f"; {failure}: the old model's caches stay in memory"
            await self._engine_step(steps, SwapStep.SHUTDOWN,
                                    lambda: self.engine.detach(old))
        unload = await self._engine_step(steps, SwapStep.UNLOAD,
                                         lambda: self.registry.unload(old))
        result.memory.update(active_before_unload=unload.before.active_bytes,
                             active_after_unload=unload.after.active_bytes,
                             rss_after_unload=unload.after.rss_bytes)
        log_transition(old, VersionState.RECLAIMED)

    def _drop_lane(self, loaded: LoadedModel) -> None:
        """Engine thread: the model's lane and cache tag go (its caches are on disk)."""
        self.engine.detach(loaded)
        self.store.remove_model(self._tag(loaded))

    def _discard(self, loaded: LoadedModel | None) -> None:
        """Engine thread: undo a target that failed before its promotion (nothing ran on
        it, so it holds no agent's cache)."""
        if loaded is None:
            return
        self._drop_lane(loaded)
        self.registry.unload(loaded)

    # ---- the sequential path ---------------------------------------------------------
    async def _bring_up(self, steps: list[StepTiming], model_id: str,
                        phase: Phase = "swap") -> LoadedModel:
        """Steps 5-8: load, reconfigure (a batch lane), retag (the store takes its
        caches), reinit (new requests go to it)."""
        loaded = await self._engine_step(steps, SwapStep.LOAD,
                                         lambda: self.registry.load(model_id), phase)
        await self._engine_step(steps, SwapStep.RECONFIGURE,
                                lambda: self.engine.attach(loaded, self._tag(loaded)), phase)
        await self._engine_step(steps, SwapStep.RETAG,
                                lambda: self.store.add_model(self._tag(loaded), loaded.dims),
                                phase)

        async def reinit() -> None:
            self.versions.promote(loaded)

        await self._timed(steps, SwapStep.REINIT, reinit, phase)
        return loaded

    async def _sequential(self, result: SwapResult, old: LoadedModel | None, model_id: str,
                          timeout: float) -> None:
        self.gate.transition(ServerState.SWAPPING)
        try:
            await self._take_down(result, old, timeout)
            loaded = await self._bring_up(result.steps, model_id)
            result.memory.update(active_after_load=loaded.stats.after.active_bytes,
                                 weights_old=old.weight_bytes if old else 0,
                                 weights_new=loaded.weight_bytes)
            result.message = f"swapped {result.old_model_id} -> {model_id}"
            self.gate.transition(ServerState.READY)
        except _StepFailed as failure:
            if failure.step in ABORTABLE:  # nothing unloaded, nothing lost
                self._abort(result, failure)
            else:
                await self._recover(result, failure)

    async def _take_down(self, result: SwapResult, old: LoadedModel | None,
                         timeout: float) -> None:
        """Steps 1-4: drain, evict, shutdown, unload. A failure in the first two aborts."""
        async def drain() -> None:
            if not await self.gate.drain(timeout):
                raise TimeoutError(f"{self.gate.in_flight} requests still running after "
                                   f"{timeout:g} s")

        await self._timed(result.steps, SwapStep.DRAIN, drain)
        tag = self._tag(old) if old is not None else None  # the models beside keep theirs
        evicted = await self._engine_step(result.steps, SwapStep.EVICT,
                                          lambda: self.store.evict_all(tag))
        result.evicted_agents = len(evicted)
        self.versions.withdraw()
        if old is None:  # degraded: nothing serves, but a rollback that failed half way
            # may have left a model loaded: it goes now
            await self._engine_step(result.steps, SwapStep.SHUTDOWN, self._drop_partial)
            result.steps.append(StepTiming(SwapStep.UNLOAD, 0.0, True))
            return
        await self._engine_step(result.steps, SwapStep.SHUTDOWN, lambda: self._drop_lane(old))
        unload = await self._engine_step(result.steps, SwapStep.UNLOAD,
                                         lambda: self.registry.unload(old))
        result.memory.update(active_before_unload=unload.before.active_bytes,
                             active_after_unload=unload.after.active_bytes,
                             rss_after_unload=unload.after.rss_bytes)

    def _abort(self, result: SwapResult, failure: _StepFailed) -> None:
        result.status = SwapOutcome.ABORTED
        result.failed_step = failure.step
        kept = ("every agent cache stays in memory" if failure.step is SwapStep.EVICT
                else "running requests go on")
        result.message = (f"{failure}; nothing was unloaded, {result.old_model_id} keeps "
                          f"serving and {kept}")
        self.gate.transition(ServerState.READY)
        log.warning("swap aborted", extra={"fields": {"reason": result.message}})

    async def _recover(self, result: SwapResult, failure: _StepFailed) -> None:
        """Roll back to the old model; if that fails too, the server is degraded."""
        old = result.old_model_id
        reason = str(failure)
        result.failed_step = failure.step
        try:
            self.versions.withdraw()
            await self.engine.on_thread(self._drop_partial)
            if old is None:
                raise RuntimeError("no previous model to roll back to")
            await self._bring_up(result.rollback_steps, old, "rollback")
        except Exception as exc:  # the rollback itself failed: say so, keep running
            result.status = SwapOutcome.DEGRADED
            result.message = f"{reason}; rollback to {old} failed: {exc}"
            self.gate.transition(ServerState.DEGRADED, result.message)
            log.error("server state", extra={"fields": {"state": "degraded",
                                                         "reason": result.message}})
            return
        result.status = SwapOutcome.ROLLED_BACK
        result.message = f"{reason}; rolled back to {old}"
        self.gate.transition(ServerState.READY)
        log.warning("swap rolled back", extra={"fields": {"reason": result.message}})

    def _drop_partial(self) -> None:
        """Engine thread: forget the half-up model a failed bring-up left (it never served,
        so it holds no agent's cache); the models beside stay."""
        beside = {id(v.loaded) for v in self.versions.beside.values()}
        for loaded in [m for m in self.registry.resident if id(m) not in beside]:
            self._discard(loaded)
