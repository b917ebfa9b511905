"""Operational routes: ``GET /health`` and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from semantic_server.blas import blas_status
from semantic_server.engine.gate import ServerState


async def health(request: Request) -> JSONResponse:
    server = request.app.state.server
    gate = server.gate
    loaded = server.engine.loaded
    body = {
        "state": gate.state.value,
        "model": loaded.model_id if loaded else None,
        "in_flight": gate.in_flight,
        "held": gate.held,
        "active_sequences": server.engine.active_jobs,
        "blas": blas_status().name,
    }
    if gate.state is ServerState.DEGRADED:
        body["reason"] = gate.degraded_reason
    return JSONResponse(body, status_code=503 if gate.state is ServerState.DEGRADED else 200)


async def metrics(request: Request) -> Response:
    registry = request.app.state.server.metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)  # reads cache files' sizes
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [Route("/health", health, methods=["GET"]),
          Route("/metrics", metrics, methods=["GET"])]
