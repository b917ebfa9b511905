"""Models by request: load the model a request names, within the memory budget, without
thrashing (``SEMANTIC_LOAD_ON_DEMAND``, ADR-016).

A request that names an available model that is not resident waits in that model's queue
while one load serves the whole queue: beside the resident models when it fits (the dual
path: nobody else waits), otherwise after the least recently used model that may leave
has left (a model beside is unloaded; the serving model is swapped out, and the target
serves the requests that name no model from then on). The policy is data
(:class:`ResidencyPolicy`):

* **minimum residency**: a model stays at least ``min_residency_seconds`` after it came,
  whatever waits for its room, so two agents naming two models cannot flip the machine
  on every request; past it, a busy model leaves as readily as an idle one (its requests
  finish first), so no model's queue is starved by a busier one;
* **queue bound**: at most ``max_queue`` requests wait per model (429 beyond), and none
  waits longer than ``hold_seconds`` (503);
* **pins**: pinned models are never made to leave;
* **keep-alive**: a model beside that no request used for ``keep_alive_seconds`` is
  unloaded (the serving model stays).

A model that can never fit is a 422 at once, an unknown one a 404; a load that fails
answers its queue with a 503 naming the step that failed, and the others keep serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field

from semantic_server.engine.versions import ModelVersions
from semantic_server.errors import (
    ModelLoadFailed,
    ModelTooLarge,
    QueueFull,
    ServerBusy,
    SwapInProgress,
)
from semantic_server.swap.orchestrator import ModelSwapOrchestrator, SwapOutcome, SwapResult

RETRY_SECONDS = 0.1  # after an admin operation held the orchestrator, before trying again

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidencyPolicy:
    min_residency_seconds: float = 10.0
    max_queue: int = 32
    hold_seconds: float = 120.0
    pinned: frozenset[str] = field(default_factory=frozenset)
    keep_alive_seconds: float | None = None


class ResidencyManager:
    """Brings the models requests name (all on the event loop)."""

    def __init__(self, orchestrator: ModelSwapOrchestrator, versions: ModelVersions,
                 policy: ResidencyPolicy) -> None:
        self.orchestrator = orchestrator
        self.versions = versions
        self.policy = policy
        self.arrived: dict[str, float] = {}  # model id -> when it became resident
        self.used: dict[str, float] = {}  # model id -> when a request last named it
        self.waiting: Counter[str] = Counter()  # requests queued per model
        self._loads: dict[str, asyncio.Task] = {}  # the one load serving each model's queue
        self._lock = asyncio.Lock()  # one residency change at a time
        self._keeper: asyncio.Task | None = None

    def start(self) -> None:
        """Start unloading idle models, when a keep-alive is set."""
        if self.policy.keep_alive_seconds is not None:
            self._keeper = asyncio.create_task(self.keep_alive())

    async def stop(self) -> None:
        """Stop the keep-alive and the loads still waiting for room (at shutdown)."""
        tasks = [*([self._keeper] if self._keeper else []), *self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def touch(self, model_id: str) -> None:
        """A request ran on ``model_id`` (its recency, for the choice of who leaves)."""
        now = time.monotonic()
        self.used[model_id] = now
        self.arrived.setdefault(model_id, now)

    async def ensure(self, model_id: str) -> None:
        """Return once ``model_id`` is resident, loading it if need be."""
        if self.versions.resident(model_id) is not None:
            return
        # 404 unknown, 422 too large for the budget even alone: at once, not after a wait
        await asyncio.to_thread(self.orchestrator.preflight, model_id)
        if self.waiting[model_id] >= self.policy.max_queue:
            raise QueueFull(f"{self.waiting[model_id]} requests already wait for "
                            f"{model_id!r} to load; retry shortly", retry_after=5)
        task = self._loads.get(model_id)
        if task is None:
            task = asyncio.create_task(self._bring(model_id))
            self._loads[model_id] = task
            task.add_done_callback(lambda _: self._loads.pop(model_id, None))
        self.waiting[model_id] += 1
        try:
            await asyncio.wait_for(asyncio.shield(task), self.policy.hold_seconds)
        except TimeoutError:
            raise ServerBusy(f"model {model_id!r} did not come within "
                             f"{self.policy.hold_seconds:g} s; retry later",
                             retry_after=max(1, round(self.policy.min_residency_seconds))
                             ) from None
        finally:
            self.waiting[model_id] -= 1
            if not self.waiting[model_id]:
                del self.waiting[model_id]

    async def _bring(self, model_id: str) -> None:
        """Load ``model_id``, making room first when it does not fit beside."""
        while self.versions.resident(model_id) is None:
            async with self._lock:
                await self.orchestrator.idle()
                plan = await asyncio.to_thread(self.orchestrator.preflight, model_id)
                if plan.fits_beside:
                    await self._run(model_id, self.orchestrator.load(model_id))
                    continue
                victim, wait = self._victim()
                serving = self.versions.loaded
                if victim is not None and serving is not None and victim == serving.model_id:
                    await self._run(model_id, self.orchestrator.swap(model_id))
                    continue
                if victim is not None:
                    await self._run(victim, self.orchestrator.unload(victim))
                    continue
            if wait is None:
                raise ModelTooLarge(f"model {model_id!r} does not fit beside the pinned "
                                    f"models; unpin one or raise the memory budget")
            await asyncio.sleep(wait)  # the policy's own deadline: a residency running out

    async def _run(self, model_id: str, operation: Awaitable[SwapResult]) -> None:
        """One orchestrator operation; a failed one answers the queue with a 503."""
        try:
            result = await operation
        except SwapInProgress:  # an admin operation came first: try again after it
            await asyncio.sleep(RETRY_SECONDS)
            return
        if result.status is not SwapOutcome.SUCCESS:
            raise ModelLoadFailed(f"model {model_id!r} could not be made resident: "
                                  f"{result.status.value} at {result.failed_step or 'load'}")
        now = time.monotonic()
        if result.new_model_id:
            self.arrived[result.new_model_id] = self.used[result.new_model_id] = now
        if result.old_model_id:
            self.arrived.pop(result.old_model_id, None)

    def _victim(self) -> tuple[str | None, float | None]:
        """The least recently used resident model that may leave now, or None and how long
        until one may (None: none ever may, every other model is pinned)."""
        now = time.monotonic()
        candidates = [m for m in self.versions.live_models() if m not in self.policy.pinned]
        if not candidates:
            return None, None
        ready = [m for m in candidates
                 if now - self.arrived.get(m, 0.0) >= self.policy.min_residency_seconds]
        if ready:
            return min(ready, key=lambda m: self.used.get(m, 0.0)), None
        soonest = min(self.arrived.get(m, now) + self.policy.min_residency_seconds
                      for m in candidates)
        return None, max(0.01, soonest - now)

    async def keep_alive(self) -> None:
        """Unload models beside that no request named for ``keep_alive_seconds`` (runs
        until cancelled; the serving model and pinned ones stay)."""
        limit = self.policy.keep_alive_seconds
        if limit is None:
            return
        while True:
            await asyncio.sleep(max(0.05, limit / 4))  # the policy's clock, not a race
            now = time.monotonic()
            for model_id in list(self.versions.beside):
                idle = now - self.used.get(model_id, self.arrived.get(model_id, now))
                if model_id in self.policy.pinned or idle < limit or self._lock.locked():
                    continue
                async with self._lock:
                    try:
                        await self.orchestrator.unload(model_id)
                        self.arrived.pop(model_id, None)
                        log.info("model unloaded after its keep-alive", extra={"fields": {
                            "model": model_id, "idle_s": round(idle, 1)}})
                    except Exception as exc:  # a swap in progress, say: next round
                        log.info("keep-alive unload deferred: %s", exc)
