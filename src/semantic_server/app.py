"""The Starlette application; its lifespan wires catalog, registry, engine, caches and gate.

Every part is built here and handed to the next, so a test can build the same server with
any settings, and nothing else in the package holds global state.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psutil
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from semantic_server.api import (
    admin_routes,
    anthropic_routes,
    completions_routes,
    openai_routes,
    ops_routes,
    responses_routes,
)
from semantic_server.api.client_watch import ClientWatchMiddleware
from semantic_server.api.errors import handle_any, handle_disconnect, handle_http
from semantic_server.api.guard import GuardMiddleware
from semantic_server.api.request_id import RequestIdMiddleware
from semantic_server.api.session_path import SessionPathMiddleware
from semantic_server.blas import blas_status
from semantic_server.cache.agent_store import AgentCacheStore
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import write_prepared
from semantic_server.cache.cache_writer import CacheWriter
from semantic_server.cache.response_records import ResponseRecords
from semantic_server.cache.shared_store import SharedStore
from semantic_server.config import Settings
from semantic_server.engine.batch_engine import (
    BatchEngine,
    EngineStopped,
    GeneratorFactory,
    batch_generator,
)
from semantic_server.engine.gate import AdmissionGate
from semantic_server.engine.service import GenerationService
from semantic_server.engine.versions import ModelVersions
from semantic_server.errors import CacheWriteError, SemanticServerError
from semantic_server.models.adapters import AdapterCatalog
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.registry import ModelRegistry
from semantic_server.observability import Metrics, configure_logging
from semantic_server.server_context import ServerContext
from semantic_server.snapshot import take_snapshot
from semantic_server.swap.adapter_swap import AdapterSwapper
from semantic_server.swap.orchestrator import ModelSwapOrchestrator
from semantic_server.swap.residency import ResidencyManager, ResidencyPolicy

log = logging.getLogger("semantic_server")


def shared_store(settings: Settings) -> SharedStore | None:
    """The Redis store other servers share, when ``SEMANTIC_CACHE_STORE`` names one."""
    url = settings.cache_store.get_secret_value()
    if url == "file":
        return None
    shared = SharedStore(url, settings.redis_max_value_bytes)
    log.info("agent caches shared through %s as %s", shared.where, shared.server_id)
    return shared


def kv_budget(settings: Settings) -> int:
    """The configured KV budget, or a quarter of the memory free at startup."""
    return settings.kv_budget_bytes or psutil.virtual_memory().available // 4


def write_behind_bytes(settings: Settings, kv_bytes: int) -> int:
    """The configured bound on evicted caches waiting for the writer, or a quarter of the
    KV budget."""
    configured = settings.cache_write_behind_bytes
    return kv_bytes // 4 if configured is None else configured


def memory_budget(settings: Settings, kv_bytes: int) -> int:
    """The configured memory budget for model weights, or three quarters of RAM less the
    KV budget."""
    return settings.memory_budget_bytes or max(
        1, psutil.virtual_memory().total * 3 // 4 - kv_bytes)


def disk_budget(settings: Settings) -> int:
    """The configured disk budget for cold caches, or half the free space of the disk that
    holds the cache folder at startup."""
    if settings.cache_disk_bytes:
        return settings.cache_disk_bytes
    folder = settings.cache_dir
    while not folder.exists():  # the folder is created on the first write
        folder = folder.parent
    return shutil.disk_usage(folder).free // 2


async def start_server(settings: Settings, *, registry: ModelRegistry | None = None,
                       make_generator: GeneratorFactory = batch_generator) -> ServerContext:
    """Load the startup model on the engine thread and assemble the server around it.

    ``registry`` and ``make_generator`` replace the real model loading and generation (the
    fast tests give fakes that compute no model); everything else is the real server.
    """
    catalog = ModelCatalog(settings.models_dir, settings.extra_models)
    adapters = AdapterCatalog(settings.adapters_dir)
    registry = registry or ModelRegistry(catalog, settings.compute_dtype, adapters,
                                         settings.lora_slots, settings.lora_max_rank)
    pool = BlockPool(kv_budget(settings), settings.block_tokens)
    shared = shared_store(settings)
    writer = (CacheWriter(shared.write_through if shared else write_prepared)
              if settings.cache_write_behind or shared else None)
    store = AgentCacheStore(pool, settings.cache_dir, settings.cache_reuse,
                             disk_budget(settings), settings.cache_disk_format, writer, shared,
                             settings.cache_chunk_tokens or None,
                             write_behind_bytes(settings, pool.budget_bytes))
    engine = BatchEngine(store, max_batch=settings.max_batch,
                         prefill_step_size=settings.prefill_step_size,
                         shared_prefix_entries=settings.shared_prefix_entries,
                         shared_prefix_bytes=pool.budget_bytes // 8,
                         make_generator=make_generator)
    gate = AdmissionGate(settings.swap_hold_seconds)
    versions = ModelVersions()
    metrics = Metrics(lambda: take_snapshot(engine, gate, versions, pool, store, orchestrator))
    orchestrator = ModelSwapOrchestrator(
        catalog=catalog, registry=registry, engine=engine, store=store, gate=gate,
        versions=versions, observer=metrics, block_tokens=settings.block_tokens,
        memory_budget_bytes=memory_budget(settings, pool.budget_bytes))
    residency = ResidencyManager(orchestrator, versions, ResidencyPolicy(
        settings.min_residency_seconds, settings.max_model_queue, settings.swap_hold_seconds,
        frozenset(settings.pinned_models), settings.keep_alive_seconds))
    service = GenerationService(engine, gate, versions, catalog, metrics,
                                settings.max_context_tokens, settings.max_queued, adapters,
                                residency, settings.load_on_demand,
                                settings.agent_lease_seconds)
    engine.start()
    log.info("BLAS: %s", blas_status().detail)
    try:
        loaded = await orchestrator.start(settings.model)
    except BaseException:
        engine.shutdown()
        raise
    residency.start()
    log.info("serving %s (load %.2f s; KV budget %d MiB in blocks of %d tokens; memory "
             "budget %d MiB; disk budget %d MiB)", loaded.model_id, loaded.stats.seconds,
             pool.budget_bytes // 2**20, pool.block_tokens,
             orchestrator.memory_budget_bytes // 2**20, store.disk_budget_bytes // 2**20)
    return ServerContext(settings, catalog, adapters, registry,
                         engine, pool, store, gate, versions, service, orchestrator,
                         AdapterSwapper(adapters, engine, versions, orchestrator, metrics),
                         residency, metrics, ResponseRecords(settings.cache_dir))


async def stop_server(server: ServerContext) -> None:
    """Write every hot cache to disk, then stop the engine (SIGTERM ends up here)."""
    await server.residency.stop()
    try:
        written = await server.engine.on_thread(server.store.evict_all)
        log.info("wrote %d hot agent caches to disk before exit", len(written))
    except (CacheWriteError, EngineStopped) as exc:  # the process ends anyway; older files
        log.error("some agent caches were lost at exit: %s", exc)  # stay valid
    finally:
        await asyncio.to_thread(server.store.close)  # the writer's last files
        server.engine.shutdown()


def create_app(settings: Settings | None = None, *, registry: ModelRegistry | None = None,
               make_generator: GeneratorFactory = batch_generator) -> Starlette:
    """The ASGI app; ``registry`` and ``make_generator`` as for :func:`start_server`."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.server = await start_server(settings, registry=registry,
                                              make_generator=make_generator)
        try:
            yield
        finally:
            await stop_server(app.state.server)

    app = Starlette(
        routes=[*openai_routes.routes, *completions_routes.routes, *anthropic_routes.routes,
                *responses_routes.routes, *admin_routes.routes, *ops_routes.routes],
        lifespan=lifespan,
        exception_handlers={
            HTTPException: handle_http,
            ClientDisconnect: handle_disconnect,  # not Exception's: that one is re-raised
            ValidationError: handle_any,
            SemanticServerError: handle_any,
            Exception: handle_any,
        },
    )
    app.add_middleware(ClientWatchMiddleware, send_timeout=settings.send_timeout_seconds)
    app.add_middleware(GuardMiddleware, bound_host=settings.host,
                       api_keys=[key.get_secret_value() for key in settings.api_keys])
    app.add_middleware(RequestIdMiddleware)  # added late: outer, so ids reach logs
    app.add_middleware(SessionPathMiddleware)  # outermost: everything sees the plain path
    return app


SEND_BUFFER_BYTES = 64 * 1024


def run(settings: Settings) -> None:
    """Serve until SIGTERM. The listening socket's send buffer is fixed (connections inherit
    it) so that a client that stops reading blocks the server's writes after a few dozen
    KB, where the send timeout can see it, instead of after megabytes of autotuned buffer."""
    configure_logging()
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level="info", log_config=None, access_log=False)
    listener = config.bind_socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    uvicorn.Server(config).run(sockets=[listener])
