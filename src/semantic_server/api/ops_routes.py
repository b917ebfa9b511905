"""Operational routes: ``GET /health`` and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from semantic_server.engine.gate import ServerState


async def health(request: Request) -> JSONResponse:
    state = request.app.state.server.snapshot()
    body = {
        "state": state.state.value,
        "model": state.model_id,
        "resident": sorted({v.model_id for v in state.versions if v.state == "serving"}),
        "pinned": sorted(state.pinned),
        "in_flight": state.in_flight,
        "held": state.held,
        "active_sequences": state.active_sequences,
        "blas": state.blas,
    }
    degraded = state.state is ServerState.DEGRADED
    if degraded:  # the details (exception text, paths) are in the admin API
        body["reason"] = state.public_reason
    return JSONResponse(body, status_code=503 if degraded else 200)


async def metrics(request: Request) -> Response:
    registry = request.app.state.server.metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)  # formatting is CPU work
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/health", health, methods=["GET"]),
          Route("/metrics", metrics, methods=["GET"])]
