"""ModelSwapOrchestrator: change the one loaded model without losing any agent's cache.

A preflight checks the target before anything stops (a bad target is refused while the old
model keeps serving). Then eight timed steps (``SwapStep``): drain, evict, shutdown, unload,
load, reconfigure, retag, reinit. Every step that touches MLX runs on the engine thread.
How a swap ends is a ``SwapOutcome``: a drain that times out or caches that cannot be
written stop it before anything is unloaded (``aborted``); a failure from load onwards
rolls back to the old model (``rolled_back``, with the rollback's own steps); if the
rollback fails too the server is ``degraded`` until a later swap succeeds. The server's
first load at startup runs the same bring-up steps. Requests that arrive meanwhile wait at
the gate and run on whichever model is loaded when it reopens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psutil

from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import CacheTag
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.gate import AdmissionGate, ServerState
from semantic_server.errors import CacheWriteError, ModelInvalid, SwapInProgress
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import dims_from_config
from semantic_server.models.registry import LoadedModel, ModelRegistry

if TYPE_CHECKING:
    from semantic_server.observability import Observer

log = logging.getLogger(__name__)
Phase = Literal["startup", "swap", "rollback"]  # which bring-up a step's log line belongs to


class SwapStep(StrEnum):
    """The eight steps of a swap, in the order they run."""

    DRAIN = "drain"
    EVICT = "evict"
    SHUTDOWN = "shutdown"
    UNLOAD = "unload"
    LOAD = "load"
    RECONFIGURE = "reconfigure"
    RETAG = "retag"
    REINIT = "reinit"


# A failure in these steps stops the swap with nothing changed; after them, it rolls back.
ABORTABLE = (SwapStep.DRAIN, SwapStep.EVICT)


class SwapOutcome(StrEnum):
    SUCCESS = "success"
    ABORTED = "aborted"  # stopped before anything was unloaded: the old model serves on
    ROLLED_BACK = "rolled_back"  # the target failed to come up; the old model is back
    DEGRADED = "degraded"  # the rollback failed too: no model serves


@dataclass
class StepTiming:
    name: SwapStep
    duration_ms: float
    ok: bool


@dataclass
class SwapResult:
    status: SwapOutcome
    old_model_id: str | None
    new_model_id: str
    message: str = ""
    duration_ms: float = 0.0
    steps: list[StepTiming] = field(default_factory=list)
    rollback_steps: list[StepTiming] = field(default_factory=list)
    evicted_agents: int = 0
    failed_step: SwapStep | None = None
    memory: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StepFailed(Exception):
    def __init__(self, step: SwapStep, cause: BaseException) -> None:
        super().__init__(f"{step} failed: {cause}")
        self.step = step


def estimated_bytes(path: Path, config: dict[str, Any], compute_float32: bool) -> int:
    """What the weights will occupy once loaded: a quantized file grows to float32 on CPU.

    A quantized weight of ``bits`` bits also carries its group's scale and bias (two 16-bit
    values per ``group_size`` weights, so ``32 / group_size`` bits more per weight); the
    file's size over those bits per weight is the number of weights, four bytes each
    once dequantized.
    """
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    quantization = config.get("quantization") or {}
    bits = quantization.get("bits")
    if not (compute_float32 and bits):
        return size
    bits_per_weight = bits + 32 / quantization.get("group_size", 64)
    return int(size * 32 / bits_per_weight)


class ModelSwapOrchestrator:
    def __init__(self, *, catalog: ModelCatalog, registry: ModelRegistry, engine: BatchEngine,
                 pool: BlockPool, store: AgentCacheStore, gate: AdmissionGate,
                 observer: Observer, block_tokens: int, history: int = 20) -> None:
        self.catalog = catalog
        self.registry = registry
        self.engine = engine
        self.pool = pool
        self.store = store
        self.gate = gate
        self.observer = observer
        self.block_tokens = block_tokens
        self.history: deque[SwapResult] = deque(maxlen=history)
        self._running: asyncio.Task | None = None

    def preflight(self, model_id: str) -> None:
        """Refuse a target that cannot work before anything stops (404 / 422)."""
        path = self.catalog.resolve(model_id)
        config = self.catalog.read_config(model_id)
        try:
            dims_from_config(config, self.registry.kv_dtype_name(config))
        except ValueError as exc:
            raise ModelInvalid(f"model {model_id!r}: {exc}") from exc
        current = self.registry.current
        need = estimated_bytes(path, config, self.registry.compute_dtype is not None)
        freed = current.stats.after.active_bytes if current else 0
        available = psutil.virtual_memory().available + freed
        if need > available:
            raise ModelInvalid(f"model {model_id!r} needs about {need / 2**30:.1f} GiB; "
                               f"{available / 2**30:.1f} GiB would be available")

    async def start(self, model_id: str) -> LoadedModel:
        """The server's first model: the bring-up steps of a swap, with nothing to undo."""
        try:
            return await self._bring_up([], model_id, "startup")
        except _StepFailed as failure:
            raise failure.__cause__ from None

    async def swap(self, model_id: str, timeout_seconds: float = 60.0) -> SwapResult:
        """Swap to ``model_id``; every swap that passed its preflight ends in history and
        metrics with its outcome, whatever that is.

        A swap runs in a task of its own: once begun it finishes even if its caller is
        cancelled (an admin client that disconnects), since stopping between two steps
        would leave the server half swapped. One swap at a time: a second is refused.
        """
        if self._running is not None:
            raise SwapInProgress("another swap is in progress")
        self._running = asyncio.create_task(self._swap_once(model_id, timeout_seconds))
        return await asyncio.shield(self._running)

    async def _swap_once(self, model_id: str, timeout_seconds: float) -> SwapResult:
        try:
            # Resolving may read files or download a hub repo: not on the event loop.
            await asyncio.to_thread(self.preflight, model_id)
            result = await self._swap(model_id, timeout_seconds)
            self.history.append(result)
            self.observer.swap_finished(result)
            return result
        finally:
            self._running = None

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

    async def _bring_up(self, steps: list[StepTiming], model_id: str,
                        phase: Phase = "swap") -> LoadedModel:
        """Steps 5-8: load, reconfigure, retag, reinit."""
        loaded = await self._engine_step(steps, SwapStep.LOAD,
                                         lambda: self.registry.load(model_id), phase)
        await self._engine_step(steps, SwapStep.RECONFIGURE,
                                lambda: self.pool.reconfigure(loaded.dims), phase)
        tag = CacheTag.for_model(loaded.tag, self.block_tokens)
        await self._engine_step(steps, SwapStep.RETAG, lambda: self.store.retag(tag), phase)
        await self._engine_step(steps, SwapStep.REINIT, lambda: self.engine.attach(loaded),
                                phase)
        return loaded

    async def _swap(self, model_id: str, timeout: float) -> SwapResult:
        old = self.registry.current.model_id if self.registry.current else None
        result = SwapResult(SwapOutcome.SUCCESS, old, model_id)
        started = time.perf_counter()
        self.gate.transition(ServerState.SWAPPING)
        try:
            await self._take_down(result, timeout)
            loaded = await self._bring_up(result.steps, model_id)
            result.memory["active_after_load"] = loaded.stats.after.active_bytes
            result.message = f"swapped {old} -> {model_id}"
            self.gate.transition(ServerState.READY)
        except _StepFailed as failure:
            if failure.step in ABORTABLE:  # nothing unloaded, nothing lost
                self._abort(result, failure, old)
            else:
                await self._recover(result, old, failure)
        result.duration_ms = (time.perf_counter() - started) * 1e3
        return result

    async def _take_down(self, result: SwapResult, timeout: float) -> None:
        """Steps 1-4: drain, evict, shutdown, unload. A failure in the first two aborts."""
        async def drain() -> None:
            if not await self.gate.drain(timeout):
                raise TimeoutError(f"{self.gate.in_flight} requests still running after "
                                   f"{timeout:g} s")

        await self._timed(result.steps, SwapStep.DRAIN, drain)
        evicted = await self._engine_step(result.steps, SwapStep.EVICT, self.store.evict_all)
        result.evicted_agents = len(evicted)
        await self._engine_step(result.steps, SwapStep.SHUTDOWN, self.engine.detach)
        if self.registry.current is None:
            result.steps.append(StepTiming(SwapStep.UNLOAD, 0.0, True))
            return
        unload = await self._engine_step(result.steps, SwapStep.UNLOAD, self.registry.unload)
        result.memory = {"active_before_unload": unload.before.active_bytes,
                         "active_after_unload": unload.after.active_bytes,
                         "rss_after_unload": unload.after.rss_bytes}

    def _abort(self, result: SwapResult, failure: _StepFailed, old: str | None) -> None:
        result.status = SwapOutcome.ABORTED
        result.failed_step = failure.step
        kept = ("every agent cache stays in memory" if failure.step is SwapStep.EVICT
                else "running requests go on")
        result.message = f"{failure}; nothing was unloaded, {old} keeps serving and {kept}"
        self.gate.transition(ServerState.READY)
        log.warning("swap aborted", extra={"fields": {"reason": result.message}})

    async def _recover(self, result: SwapResult, old: str | None, failure: _StepFailed) -> None:
        """Roll back to ``old``; if that fails too, the server is degraded."""
        reason = str(failure)
        result.failed_step = failure.step
        try:
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
        """Engine thread: forget whatever half-finished state the failed swap left."""
        if self.engine.loaded is not None:
            try:
                self.store.evict_all()
            except CacheWriteError as exc:  # the half-up model's caches are not worth a failure
                log.error("dropping caches of a failed swap: %s", exc)
            self.engine.detach()
        if self.registry.current is not None:
            self.registry.unload()
