"""One typed snapshot of the server's state, built in one place.

``/health``, ``/admin/models/current`` (and so the ``status`` command) and the metrics
collector all read this, so they can never disagree about what the server is doing. It
reads counters and in-memory indexes only (no disk, no MLX work), so the event loop can
take one at any time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from semantic_server.blas import blas_status
from semantic_server.cache.agent_store import AgentCacheStore, Lookup, Residency
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import CacheTag
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.gate import DEGRADED_PUBLIC, AdmissionGate, ServerState
from semantic_server.engine.service import ENGINE_STOPPED_PUBLIC
from semantic_server.engine.versions import ModelVersions
from semantic_server.models.dims import ModelDims
from semantic_server.models.registry import MemorySnapshot
from semantic_server.swap.orchestrator import ModelSwapOrchestrator


@dataclass(frozen=True)
class PoolState:
    budget_bytes: int
    used_bytes: int  # hot agent caches
    reserved_bytes: int  # running requests and the anonymous prefix caches
    block_tokens: int


@dataclass(frozen=True)
class VersionInfo:
    """A resident model version and the requests pinned to it."""

    model_id: str
    version: int
    state: str  # serving | retiring
    pinned: int
    adapter: str | None = None  # the adapter its requests use unless they name one
    default: bool = False  # it takes the requests that name no model


@dataclass(frozen=True)
class ServerSnapshot:
    state: ServerState
    reason: str | None  # why the server is degraded: for the admin API and the logs
    public_reason: str | None  # the same, short and safe for anyone
    model_id: str | None
    dims: ModelDims | None
    tag: str | None  # digest of the active cache tag
    fingerprint: str | None
    versions: tuple[VersionInfo, ...]
    swapping: str | None  # the path of the swap in progress (dual | sequential), if any
    loading: str | None  # the model that swap (or a load beside) brings, while it runs
    memory_budget_bytes: int
    in_flight: int
    held: int
    active_sequences: int
    queued: int
    pool: PoolState
    caches: Residency
    lookups: dict[Lookup, int]
    write_failures: int
    disk_deletions: int
    writing_bytes: int  # spills waiting for the writer thread
    write_behind_waits: int
    disk_budget_bytes: int | None
    memory: MemorySnapshot
    blas: str
    pinned: frozenset[str] = frozenset()  # models load on demand and keep-alive never unload
    shared_errors: dict[str, int] = field(default_factory=dict)  # failed Redis calls

    def model_state(self, model_id: str) -> str:
        """Where a model is: serving (resident: the default or beside it), loading,
        retiring, or available."""
        states = {v.state for v in self.versions if v.model_id == model_id}
        if "serving" in states:
            return "serving"
        if model_id == self.loading:
            return "loading"
        return "retiring" if "retiring" in states else "available"

    def current(self) -> dict[str, Any]:
        """The JSON of ``/admin/models/current``."""
        return {
            "model_id": self.model_id,
            "state": self.state.value,
            "reason": self.reason,
            "dims": self.dims.as_dict() if self.dims else None,
            "tag": self.tag,
            "fingerprint": self.fingerprint,
            "swapping": self.swapping,
            "versions": [vars(v) for v in self.versions],
            "memory": {"mlx_active_bytes": self.memory.active_bytes,
                       "mlx_peak_bytes": self.memory.peak_bytes,
                       "rss_bytes": self.memory.rss_bytes,
                       "budget_bytes": self.memory_budget_bytes},
            "kv_pool": {"budget_bytes": self.pool.budget_bytes,
                        "used_bytes": self.pool.used_bytes,
                        "reserved_bytes": self.pool.reserved_bytes,
                        "block_tokens": self.pool.block_tokens},
            "caches": {"hot_agents": self.caches.hot_agents, "hot_bytes": self.caches.hot_bytes,
                       "cold_agents": self.caches.cold_agents,
                       "cold_bytes": self.caches.cold_bytes,
                       "disk_budget_bytes": self.disk_budget_bytes,
                       "disk_deletions": self.disk_deletions,
                       "write_failures": self.write_failures,
                       "writing_bytes": self.writing_bytes,
                       "write_behind_waits": self.write_behind_waits,
                       "lookups": {k.value: v for k, v in self.lookups.items()}},
        }


def take_snapshot(engine: BatchEngine, gate: AdmissionGate, versions: ModelVersions,
                  pool: BlockPool, store: AgentCacheStore,
                  orchestrator: ModelSwapOrchestrator,
                  pinned: frozenset[str] = frozenset()) -> ServerSnapshot:
    loaded = versions.loaded
    tag = CacheTag.for_model(loaded.tag, pool.block_tokens) if loaded else None
    state, reason, public = gate.state, gate.degraded_reason or None, DEGRADED_PUBLIC
    if engine.failure is not None:
        state, reason = ServerState.DEGRADED, f"the engine thread stopped: {engine.failure}"
        public = ENGINE_STOPPED_PUBLIC
    degraded = state is ServerState.DEGRADED
    return ServerSnapshot(
        state=state,
        reason=reason if degraded else None,
        public_reason=public if degraded else None,
        model_id=loaded.model_id if loaded else None,
        dims=loaded.dims if loaded else None,
        tag=tag.digest if tag else None,
        fingerprint=loaded.tag.fingerprint if loaded else None,
        versions=tuple(VersionInfo(model_id, version, state.value, pins, adapter,
                                   loaded is not None and version == loaded.version)
                       for version, (model_id, pins, adapter, state)
                       in versions.pinned().items()),
        swapping=orchestrator.swapping.value if orchestrator.swapping else None,
        loading=orchestrator.target,
        memory_budget_bytes=orchestrator.memory_budget_bytes,
        in_flight=gate.in_flight,
        held=gate.held,
        active_sequences=engine.active_jobs,
        queued=engine.queued_jobs,
        pool=PoolState(pool.budget_bytes, pool.used, pool.reserved, pool.block_tokens),
        caches=store.residency(),
        lookups={outcome: store.lookups.get(outcome, 0) for outcome in Lookup},
        write_failures=store.write_failures,
        disk_deletions=store.disk_deletions,
        writing_bytes=store.writing_bytes,
        write_behind_waits=store.write_behind_waits,
        disk_budget_bytes=store.disk_budget_bytes,
        memory=MemorySnapshot.now(),
        blas=blas_status().name,
        pinned=pinned,
        shared_errors=dict(store.shared.errors) if store.shared else {},
    )
