"""ModelSwapOrchestrator: change the one loaded model without losing any agent's cache.

A preflight checks the target before anything stops (a bad target is refused while the old
model keeps serving). Then eight timed steps: drain, evict, shutdown, unload, load,
reconfigure, retag, reinit. Every step that touches MLX runs on the engine thread through
``engine.call``. A failure from load onwards rolls back to the old model; if the rollback
fails too the server is degraded until a later swap succeeds. Requests that arrive
meanwhile wait at the gate and run on whichever model is loaded when it reopens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import CacheTag
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.gate import AdmissionGate, ServerState
from semantic_server.errors import CacheWriteError, ModelInvalid, SwapInProgress, SwapTimeout
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import dims_from_config
from semantic_server.models.registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)
STEPS = ("drain", "evict", "shutdown", "unload", "load", "reconfigure", "retag", "reinit")


@dataclass
class StepTiming:
    name: str
    duration_ms: float
    ok: bool


@dataclass
class SwapResult:
    status: str  # "success", "rolled_back" or "degraded"
    old_model_id: str | None
    new_model_id: str
    message: str = ""
    duration_ms: float = 0.0
    steps: list[StepTiming] = field(default_factory=list)
    evicted_agents: int = 0
    failed_step: str | None = None
    memory: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StepFailed(Exception):
    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"{step} failed: {cause}")
        self.step = step


def _estimated_bytes(path: Path, config: dict[str, Any], compute_float32: bool) -> int:
    """What the weights will occupy once loaded: a quantized file grows to float32 on CPU."""
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    bits = (config.get("quantization") or {}).get("bits")
    return int(size * 32 / (bits + 1)) if compute_float32 and bits else size


class ModelSwapOrchestrator:
    def __init__(self, *, catalog: ModelCatalog, registry: ModelRegistry, engine: BatchEngine,
                 pool: BlockPool, store: AgentCacheStore, gate: AdmissionGate,
                 block_tokens: int, history: int = 20) -> None:
        self.catalog = catalog
        self.registry = registry
        self.engine = engine
        self.pool = pool
        self.store = store
        self.gate = gate
        self.block_tokens = block_tokens
        self.history: deque[SwapResult] = deque(maxlen=history)
        self._lock = asyncio.Lock()

    def preflight(self, model_id: str) -> None:
        """Refuse a target that cannot work before anything stops (404 / 422)."""
        path = self.catalog.resolve(model_id)
        config = self.catalog.read_config(model_id)
        try:
            dims_from_config(config, self.registry.kv_dtype_name(config))
        except ValueError as exc:
            raise ModelInvalid(f"model {model_id!r}: {exc}") from exc
        current = self.registry.current
        need = _estimated_bytes(path, config, self.registry.compute_dtype is not None)
        freed = current.stats.after.active_bytes if current else 0
        available = psutil.virtual_memory().available + freed
        if need > available:
            raise ModelInvalid(f"model {model_id!r} needs about {need / 2**30:.1f} GiB; "
                               f"{available / 2**30:.1f} GiB would be available")

    async def swap(self, model_id: str, timeout_seconds: float = 60.0) -> SwapResult:
        if self._lock.locked():
            raise SwapInProgress("another swap is in progress")
        async with self._lock:
            # Resolving may read files or download a hub repo: not on the event loop.
            await asyncio.to_thread(self.preflight, model_id)
            result = await self._swap(model_id, timeout_seconds)
            self.history.append(result)
            return result

    async def _timed(self, result: SwapResult, name: str,
                     step: Callable[[], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        try:
            value = await step()
        except BaseException as exc:
            result.steps.append(StepTiming(name, (time.perf_counter() - started) * 1e3, False))
            log.error("swap step failed", extra={"fields": {
                "step": name, "duration_ms": result.steps[-1].duration_ms, "error": str(exc)}})
            raise _StepFailed(name, exc) from exc
        result.steps.append(StepTiming(name, (time.perf_counter() - started) * 1e3, True))
        log.info("swap step", extra={"fields": {
            "step": name, "duration_ms": round(result.steps[-1].duration_ms, 2),
            "from": result.old_model_id, "to": result.new_model_id}})
        return value

    async def _engine_step(self, result: SwapResult, name: str, fn: Callable[[], Any]) -> Any:
        """A timed step that touches MLX, the pool or the caches: run on the engine thread."""
        return await self._timed(result, name, lambda: self.engine.on_thread(fn))

    async def _bring_up(self, result: SwapResult, model_id: str) -> LoadedModel:
        """Steps 5-8: load, reconfigure, retag, reinit."""
        loaded = await self._engine_step(result, "load", lambda: self.registry.load(model_id))
        await self._engine_step(result, "reconfigure",
                                lambda: self.pool.reconfigure(loaded.dims))
        tag = CacheTag.for_model(loaded.tag, self.block_tokens)
        await self._engine_step(result, "retag", lambda: self.store.retag(tag))
        await self._engine_step(result, "reinit", lambda: self.engine.attach(loaded))
        return loaded

    async def _swap(self, model_id: str, timeout: float) -> SwapResult:
        old = self.registry.current.model_id if self.registry.current else None
        result = SwapResult("success", old, model_id)
        started = time.perf_counter()
        self.gate.transition(ServerState.SWAPPING)

        async def drain() -> None:
            if not await self.gate.drain(timeout):
                raise SwapTimeout(f"{self.gate.in_flight} requests still running after "
                                  f"{timeout:g} s; swap aborted, {old} keeps serving")

        try:
            await self._timed(result, "drain", drain)
        except _StepFailed as exc:
            self.gate.transition(ServerState.READY)
            raise exc.__cause__ from None
        try:
            evicted = await self._engine_step(result, "evict", self.store.evict_all)
        except _StepFailed as failure:  # e.g. a full disk: nothing unloaded, nothing lost
            result.failed_step = failure.step
            result.status = "rolled_back"
            result.message = (f"{failure}; nothing was unloaded, {old} keeps serving with "
                              "every agent cache in memory")
            self.gate.transition(ServerState.READY)
            log.warning("swap rolled back", extra={"fields": {"reason": result.message}})
            result.duration_ms = (time.perf_counter() - started) * 1e3
            return result
        try:
            result.evicted_agents = len(evicted)
            await self._engine_step(result, "shutdown", self.engine.detach)
            if self.registry.current is not None:
                unload = await self._engine_step(result, "unload", self.registry.unload)
                result.memory = {"active_before_unload": unload.before.active_bytes,
                                 "active_after_unload": unload.after.active_bytes,
                                 "rss_after_unload": unload.after.rss_bytes}
            else:
                result.steps.append(StepTiming("unload", 0.0, True))
            loaded = await self._bring_up(result, model_id)
            result.memory["active_after_load"] = loaded.stats.after.active_bytes
            result.message = f"swapped {old} -> {model_id}"
            self.gate.transition(ServerState.READY)
        except _StepFailed as failure:
            await self._recover(result, old, failure)
        result.duration_ms = (time.perf_counter() - started) * 1e3
        return result

    async def _recover(self, result: SwapResult, old: str | None, failure: _StepFailed) -> None:
        """Roll back to ``old``; if that fails too, the server is degraded."""
        reason = str(failure)
        result.failed_step = failure.step
        try:
            await self.engine.on_thread(self._drop_partial)
            if old is None:
                raise RuntimeError("no previous model to roll back to")
            await self._bring_up(SwapResult("", old, old), old)
        except BaseException as exc:  # the rollback itself failed: say so, keep running
            result.status = "degraded"
            result.message = f"{reason}; rollback to {old} failed: {exc}"
            self.gate.transition(ServerState.DEGRADED, result.message)
            log.error("server state", extra={"fields": {"state": "degraded",
                                                         "reason": result.message}})
            return
        result.status = "rolled_back"
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

