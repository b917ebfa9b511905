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
* **pins**: pinned models (``pinned_models``, and ``/admin/models/pin`` at run time) are
  never made to leave;
* **keep-alive**: a model beside that no request used for its keep-alive is unloaded (the
  serving model stays: it takes the requests that name no model). The keep-alive is
  ``keep_alive_seconds``, or what the last request naming the model asked for (Ollama's
  per-request ``keep_alive``: 0 unloads it once idle, a negative value keeps it).

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
from semantic_server.swap.orchestrator import ModelSwapOrchestrator
from semantic_server.swap_result import SwapOutcome, SwapResult

RETRY_SECONDS = 0.1  # after an admin operation held the orchestrator, before trying again
KEEPER_TICK_SECONDS = 1.0  # the longest the keep-alive waits between two looks

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
        self.pins: set[str] = set(policy.pinned)  # models never made to leave
        self.keep_alive_of: dict[str, float] = {}  # model id -> the last request's keep-alive
        self._asked = asyncio.Event()  # a request ended: look again now
        self._loads: dict[str, asyncio.Task] = {}  # the one load serving each model's queue
        self._lock = asyncio.Lock()  # one residency change at a time
        self._keeper: asyncio.Task | None = None

    def start(self) -> None:
        """Start unloading the models beside that stay idle past their keep-alive."""
        self._keeper = asyncio.create_task(self.keep_alive())

    async def stop(self) -> None:
        """Stop the keep-alive and the loads still waiting for room (at shutdown)."""
        tasks = [*([self._keeper] if self._keeper else []), *self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def touch(self, model_id: str) -> None:
        """A request started on ``model_id`` (its recency, for the choice of who leaves)."""
        now = time.monotonic()
        self.used[model_id] = now
        self.arrived.setdefault(model_id, now)

    def release(self, model_id: str, keep_alive: float | None) -> None:
        """A request ended on ``model_id``: the model's keep-alive is the one it asked for
        from now on, or the default when it asked for none (as each Ollama request sets
        its model's)."""
        self.used[model_id] = time.monotonic()
        if keep_alive is None:
            self.keep_alive_of.pop(model_id, None)
        else:
            self.keep_alive_of[model_id] = keep_alive
        self._asked.set()

    def pin(self, model_id: str, pinned: bool) -> None:
        """Pin ``model_id`` (load on demand and keep-alive never make it leave) or unpin it."""
        if pinned:
            self.pins.add(model_id)
        else:
            self.pins.discard(model_id)

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
        candidates = [m for m in self.versions.live_models() if m not in self.pins]
        if not candidates:
            return None, None
        ready = [m for m in candidates
                 if now - self.arrived.get(m, 0.0) >= self.policy.min_residency_seconds]
        if ready:
            return min(ready, key=lambda m: self.used.get(m, 0.0)), None
        soonest = min(self.arrived.get(m, now) + self.policy.min_residency_seconds
                      for m in candidates)
        return None, max(0.01, soonest - now)

    def _expiry(self, model_id: str) -> float | None:
        """When ``model_id`` (a model beside) may be unloaded for idleness; None: never."""
        limit = self.keep_alive_of.get(model_id, self.policy.keep_alive_seconds)
        if limit is None or limit < 0 or model_id in self.pins:
            return None
        return self.used.get(model_id, self.arrived.get(model_id, time.monotonic())) + limit

    def due(self) -> tuple[list[str], float]:
        """The models beside idle past their keep-alive (a model with requests in flight
        is never idle), and how long until the next one will be (at most a tick)."""
        now = time.monotonic()
        for model_id in self.versions.beside:  # one that came by the admin API: from now
            if model_id not in self.arrived:
                self.arrived[model_id] = self.used[model_id] = now
        busy = {model for model, pins, _, _ in self.versions.pinned().values() if pins}
        busy |= set(self.waiting)  # requests queued for a model are about to use it
        expiries = {m: t for m in self.versions.beside
                    if m not in busy and (t := self._expiry(m)) is not None}
        later = [t - now for t in expiries.values() if t > now]
        return [m for m, t in expiries.items() if t <= now], min([KEEPER_TICK_SECONDS, *later])

    async def keep_alive(self) -> None:
        """Unload each model beside once no request used it for its keep-alive (runs until
        cancelled)."""
        while True:
            self._asked.clear()
            idle, wait = self.due()
            for model_id in idle:
                await self._unload_idle(model_id)
            try:  # the policy's clock, woken early when a request ends (asyncio.timeout,
                # unlike 3.11's wait_for, never swallows the cancel that stops the loop)
                async with asyncio.timeout(max(0.01, wait)):
                    await self._asked.wait()
            except TimeoutError:
                pass

    async def _unload_idle(self, model_id: str) -> None:
        if self._lock.locked():  # a load is making room: look again next round
            return
        async with self._lock:
            if model_id not in self.due()[0]:  # used meanwhile (an earlier unload took time)
                return
            try:
                await self.orchestrator.unload(model_id)
            except Exception as exc:  # a swap in progress, say: next round
                log.info("keep-alive unload deferred: %s", exc)
                return
            keep_alive = self.keep_alive_of.pop(model_id, self.policy.keep_alive_seconds)
            self.arrived.pop(model_id, None)
            self.used.pop(model_id, None)
            log.info("model unloaded after its keep-alive", extra={"fields": {
                "model": model_id, "keep_alive_s": keep_alive}})
