"""The fast tier's fixtures: an in-process server over fake models (see tests/fakes.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from semantic_server.app import create_app, start_server, stop_server
from semantic_server.models.catalog import ModelCatalog
from semantic_server.server_context import ServerContext
from tests.fakes import (
    FAST_ADMIN_KEY,
    FakeGenerator,
    FakeModel,
    FakeRegistry,
    fake_settings,
    write_model_dirs,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake_models() -> dict[str, FakeModel]:
    """Two fake models (two ids, so swaps between them are real swaps of the server)."""
    return {"fake-a": FakeModel(reply="Hello from A."), "fake-b": FakeModel(reply="B here.")}


@pytest.fixture
async def start(tmp_path, fake_models) -> AsyncIterator[Callable[..., Awaitable[ServerContext]]]:
    """Start in-process servers (real gate, engine thread, caches, swaps and service) over
    the fake models; each is stopped, its caches written, when the test ends."""
    write_model_dirs(tmp_path / "models", list(fake_models))
    started: list[ServerContext] = []

    async def start_one(**settings: Any) -> ServerContext:
        registry = FakeRegistry(ModelCatalog(tmp_path / "models"), fake_models)
        server = await start_server(fake_settings(tmp_path, **settings), registry=registry,
                                    make_generator=FakeGenerator.factory)
        started.append(server)
        return server

    yield start_one
    for server in started:
        await stop_server(server)


@pytest.fixture
def make_client(tmp_path, fake_models) -> Iterator[Callable[..., TestClient]]:
    """TestClients of the real app over fake models, with any settings (admin key
    ``FAST_ADMIN_KEY``), on a loopback Host."""
    write_model_dirs(tmp_path / "models", list(fake_models))
    with contextlib.ExitStack() as clients:
        def make(**settings: Any) -> TestClient:
            registry = FakeRegistry(ModelCatalog(tmp_path / "models"), fake_models)
            app = create_app(fake_settings(tmp_path, admin_key=FAST_ADMIN_KEY, **settings),
                             registry=registry, make_generator=FakeGenerator.factory)
            return clients.enter_context(TestClient(app, base_url="http://127.0.0.1:8000"))

        yield make


@pytest.fixture
async def server(start) -> ServerContext:
    return await start()
