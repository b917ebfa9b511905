"""``ServerContext``: the parts of one running server, as the routes see them.

app.py builds one per server and hangs it on the Starlette app (``app.state.server``); the
routes read it from there, and tests and experiments drive a server in process through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.response_records import ResponseRecords
from semantic_server.config import Settings
from semantic_server.engine.batch_engine import BatchEngine
from semantic_server.engine.gate import AdmissionGate
from semantic_server.engine.service import GenerationService
from semantic_server.engine.versions import ModelVersions
from semantic_server.models.adapters import AdapterCatalog
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.registry import ModelRegistry
from semantic_server.observability import Metrics
from semantic_server.snapshot import ServerSnapshot, take_snapshot
from semantic_server.swap.adapter_swap import AdapterSwapper
from semantic_server.swap.orchestrator import ModelSwapOrchestrator
from semantic_server.swap.residency import ResidencyManager


@dataclass
class ServerContext:
    """The parts of one running server, as the routes see them."""

    settings: Settings
    catalog: ModelCatalog
    adapters: AdapterCatalog
    registry: ModelRegistry
    engine: BatchEngine
    pool: BlockPool
    store: AgentCacheStore
    gate: AdmissionGate
    versions: ModelVersions
    service: GenerationService
    orchestrator: ModelSwapOrchestrator
    adapter_swapper: AdapterSwapper
    residency: ResidencyManager
    metrics: Metrics
    responses: ResponseRecords  # stored responses of the Responses API

    def snapshot(self) -> ServerSnapshot:
        return take_snapshot(self.engine, self.gate, self.versions, self.pool, self.store,
                             self.orchestrator, frozenset(self.residency.pins))
