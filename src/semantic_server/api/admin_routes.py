"""Admin API: swap models and look inside the server. Guarded by ``X-Admin-Key``.

With no key configured the admin API is off (403), never open; a missing or wrong key is
a 401, compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from semantic_server.api.turn import read_json
from semantic_server.errors import AdminDisabled, ModelNotFound, Unauthorized
from semantic_server.server_context import ServerContext
from semantic_server.swap_result import (
    AdapterSwapOutcome,
    SwapMode,
    SwapOutcome,
    SwapResult,
    SwapStep,
)


class AdapterSwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field must not swap to "none"
    model_id: str = Field(min_length=1)
    adapter: str | None = Field(..., min_length=1)  # null: no adapter


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model_id: str = Field(min_length=1)
    timeout_seconds: float = Field(60.0, gt=0, le=3600)
    mode: SwapMode = SwapMode.AUTO


def require_admin(request: Request) -> ServerContext:
    server = request.app.state.server
    key = server.settings.admin_key
    if key is None or not key.get_secret_value():
        raise AdminDisabled("the admin API is off: set SEMANTIC_ADMIN_KEY to enable it")
    given = request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-Admin-Key")
    return server


def swap_status(result: SwapResult) -> int:
    """The HTTP status of a swap that ran: 200 only when the target serves."""
    if result.status is SwapOutcome.ABORTED:
        # the drain timed out (504), or the caches could not be written (507, Insufficient
        # Storage); either way nothing changed
        return 504 if result.failed_step is SwapStep.DRAIN else 507
    return 200 if result.status is SwapOutcome.SUCCESS else 500


async def swap(request: Request) -> JSONResponse:
    server = require_admin(request)
    body = SwapRequest.model_validate(await read_json(request, server.settings.max_body_bytes))
    result = await server.orchestrator.swap(body.model_id, body.timeout_seconds, body.mode)
    return JSONResponse(result.as_dict(), status_code=swap_status(result))


class ResidencyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1)
    timeout_seconds: float = Field(60.0, gt=0, le=3600)


async def residency(request: Request) -> JSONResponse:
    """``/admin/models/load``: load a model beside the resident ones (it takes the requests
    that name it); ``/admin/models/unload``: unload one loaded beside (its requests finish
    first, its caches go to disk)."""
    server = require_admin(request)
    body = ResidencyRequest.model_validate(
        await read_json(request, server.settings.max_body_bytes))
    operation = (server.orchestrator.load if request.url.path.endswith("/load")
                 else server.orchestrator.unload)
    result = await operation(body.model_id, body.timeout_seconds)
    return JSONResponse(result.as_dict(), status_code=swap_status(result))


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1)


async def pin(request: Request) -> JSONResponse:
    """``/admin/models/pin``: load on demand and keep-alive never make the model leave
    (resident or not yet); ``/admin/models/unpin``: they may again. Pins last until the
    server stops; ``SEMANTIC_PINNED_MODELS`` sets the ones it starts with."""
    server = require_admin(request)
    body = PinRequest.model_validate(await read_json(request, server.settings.max_body_bytes))
    pinned = request.url.path.endswith("/pin")
    if pinned:
        known = await asyncio.to_thread(server.catalog.available)
        if body.model_id not in {entry.model_id for entry in known}:
            raise ModelNotFound(f"model {body.model_id!r} is not available")
    server.residency.pin(body.model_id, pinned)
    return JSONResponse({"model_id": body.model_id, "pinned": pinned,
                         "pinned_models": sorted(server.residency.pins)})


async def current(request: Request) -> JSONResponse:
    server = require_admin(request)
    return JSONResponse(server.snapshot().current())


async def available(request: Request) -> JSONResponse:
    server = require_admin(request)
    resident = {v.model_id for v in server.snapshot().versions if v.state == "serving"}
    return JSONResponse({"data": [
        {"model_id": e.model_id, "source": e.source, "path": str(e.path) if e.path else None,
         "loaded": e.model_id in resident}
        for e in server.catalog.available()]})


async def swaps(request: Request) -> JSONResponse:
    server = require_admin(request)
    return JSONResponse({"data": [r.as_dict() for r in server.orchestrator.history]})


async def agents(request: Request) -> JSONResponse:
    server = require_admin(request)
    hot = await server.engine.on_thread(server.store.hot_agents)
    cold = await asyncio.to_thread(server.store.cold_agents)
    return JSONResponse({
        "hot": [{"agent_id": cache.agent_id, "state": "hot", "tokens": cache.tokens,
                 "bytes": cache.nbytes, "model_id": cache.tag.model_id,
                 "tag": cache.tag.digest} for cache in hot],
        "cold": [{**summary, "state": "cold"} for summary in cold],
        "lookups": {k.value: v for k, v in server.store.lookups.items()},
    })


async def adapters(request: Request) -> JSONResponse:
    """Every folder of the adapters folder: its adapter, or why it cannot be used."""
    server = require_admin(request)
    listings = await asyncio.to_thread(server.adapters.available)
    return JSONResponse({"data": [listing.as_dict() for listing in listings]})


async def swap_adapter(request: Request) -> JSONResponse:
    """Change the serving model's adapter in place (200, or 500 when the copy failed and
    the old adapter stays); a bad adapter is a 4xx before anything changes."""
    server = require_admin(request)
    body = AdapterSwapRequest.model_validate(
        await read_json(request, server.settings.max_body_bytes))
    result = await server.adapter_swapper.swap(body.model_id, body.adapter)
    return JSONResponse(result.as_dict(),
                        status_code=200 if result.status is AdapterSwapOutcome.SUCCESS else 500)


async def adapter(request: Request) -> JSONResponse:
    server = require_admin(request)
    found = await asyncio.to_thread(server.adapters.resolve, request.path_params["name"])
    return JSONResponse(found.as_dict())


routes = [
    Route("/admin/models/swap", swap, methods=["POST"]),
    Route("/admin/models/load", residency, methods=["POST"]),
    Route("/admin/models/unload", residency, methods=["POST"]),
    Route("/admin/models/pin", pin, methods=["POST"]),
    Route("/admin/models/unpin", pin, methods=["POST"]),
    Route("/admin/models/current", current, methods=["GET"]),
    Route("/admin/models/available", available, methods=["GET"]),
    Route("/admin/swaps", swaps, methods=["GET"]),
    Route("/admin/agents", agents, methods=["GET"]),
    Route("/admin/adapters", adapters, methods=["GET"]),
    Route("/admin/adapters/swap", swap_adapter, methods=["POST"]),
    Route("/admin/adapters/{name}", adapter, methods=["GET"]),
]
