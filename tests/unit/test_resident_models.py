"""Several resident models, in process over fake models: a model loaded beside the serving
one takes the requests that name it while the serving one keeps the rest, each agent keeps
its cache per model, nobody is held while a model loads or leaves, and what contradicts
the resident set is refused before anything changes."""

from __future__ import annotations

import asyncio
import threading

import pytest

from semantic_server.errors import ModelNotLoaded, ModelStateConflict, ModelTooLarge
from semantic_server.swap.orchestrator import LOAD_STEPS, UNLOAD_STEPS
from semantic_server.swap_result import SwapKind, SwapMode, SwapOutcome
from tests.fakes import FAST_ADMIN_KEY, WEIGHT_BYTES, run_turn
from tests.polling import wait_until

pytestmark = pytest.mark.anyio


def _resident(server) -> list[tuple[str, str, bool]]:
    return [(v.model_id, v.state, v.default) for v in server.snapshot().versions]


async def test_a_model_beside_takes_the_requests_that_name_it(server, fake_models):
    fake_models["fake-b"].load_gate = threading.Event()
    loading = asyncio.create_task(server.orchestrator.load("fake-b"))
    await wait_until(lambda: fake_models["fake-b"].loads == 1)
    during = await run_turn(server.service, "planner", "Plan the trip")  # nobody is held
    assert [server.snapshot().model_state(m) for m in ("fake-a", "fake-b")] == [
        "serving", "loading"]
    assert during.admitted.model_id == "fake-a" and server.gate.held == 0
    with pytest.raises(ModelNotLoaded):  # not resident until its load ends
        await run_turn(server.service, "scout", "Look around", model="fake-b")
    fake_models["fake-b"].load_gate.set()
    result = await loading
    assert result.status is SwapOutcome.SUCCESS and result.kind is SwapKind.LOAD
    assert [t.name for t in result.steps] == list(LOAD_STEPS)
    assert _resident(server) == [("fake-a", "serving", True), ("fake-b", "serving", False)]
    assert fake_models["fake-a"].unloads == 0 and server.snapshot().model_state("fake-b") == (
        "serving")

    # Requests for both interleave with no swap; each agent keeps its cache per model.
    first_scout = await run_turn(server.service, "scout", "Look around", model="fake-b")
    assert first_scout.text == "B here."
    plan = await run_turn(server.service, "planner", "Plan the trip")
    scout = await run_turn(server.service, "scout", "Look around", model="fake-b")
    named_a = await run_turn(server.service, "planner", "Plan the trip", model="fake-a")
    assert (plan.admitted.model_id, scout.admitted.model_id) == ("fake-a", "fake-b")
    assert plan.outcome.cached_tokens == plan.outcome.prompt_tokens - 1
    assert scout.outcome.cached_tokens == scout.outcome.prompt_tokens - 1
    assert named_a.text == "Hello from A." and fake_models["fake-b"].loads == 1
    assert server.snapshot().model_id == "fake-a"  # the default did not move
    assert server.orchestrator.history[-1].kind is SwapKind.LOAD  # no swap since


async def test_unloading_a_model_beside_lets_its_requests_finish(server, fake_models):
    await server.orchestrator.load("fake-b")
    await run_turn(server.service, "scout", "Look around", model="fake-b")
    fake_models["fake-b"].step_gate = threading.Event()
    in_flight = asyncio.create_task(
        run_turn(server.service, "scout", "Look again", model="fake-b"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    unloading = asyncio.create_task(server.orchestrator.unload("fake-b"))
    await wait_until(lambda: ("fake-b", "retiring", False) in _resident(server))
    assert server.snapshot().model_state("fake-b") == "retiring"
    with pytest.raises(ModelNotLoaded):  # it takes no new request
        await run_turn(server.service, "other", "hi", model="fake-b")
    fake_models["fake-b"].step_gate.set()
    assert (await in_flight).text == "B here."  # finished on the model it started on
    result = await unloading
    assert result.status is SwapOutcome.SUCCESS and result.kind is SwapKind.UNLOAD
    assert [t.name for t in result.steps] == list(UNLOAD_STEPS)
    assert result.evicted_agents == 1 and fake_models["fake-b"].unloads == 1
    assert _resident(server) == [("fake-a", "serving", True)]
    assert [m.model_id for m in server.registry.resident] == ["fake-a"]
    assert server.snapshot().model_state("fake-b") == "available"
    # Its agent's cache came back from disk when the model returned.
    await server.orchestrator.load("fake-b")
    back = await run_turn(server.service, "scout", "Look again", model="fake-b")
    assert back.outcome.cached_tokens == back.outcome.prompt_tokens - 1


async def test_what_contradicts_the_resident_models_is_refused(server, start):
    with pytest.raises(ModelStateConflict, match="loaded already"):
        await server.orchestrator.load("fake-a")
    with pytest.raises(ModelNotLoaded):
        await server.orchestrator.unload("fake-b")
    with pytest.raises(ModelStateConflict, match="swap to another"):
        await server.orchestrator.unload("fake-a")
    await server.orchestrator.load("fake-b")
    with pytest.raises(ModelStateConflict, match="beside"):
        await server.orchestrator.swap("fake-b")
    small = await start(memory_budget_bytes=WEIGHT_BYTES * 3 // 2)  # room for one model
    with pytest.raises(ModelTooLarge, match="beside"):
        await small.orchestrator.load("fake-b")
    assert [m.model_id for m in small.registry.resident] == ["fake-a"]
    assert len(small.orchestrator.history) == 0  # refused before anything ran


async def test_a_swap_replaces_the_serving_model_and_keeps_the_one_beside(server, fake_models,
                                                                           tmp_path):
    from tests.fakes import FakeModel, write_model_dirs

    fake_models["fake-c"] = FakeModel(reply="C speaking.")
    write_model_dirs(tmp_path / "models", ["fake-c"])
    await server.orchestrator.load("fake-b")
    for mode in (SwapMode.DUAL, SwapMode.SEQUENTIAL):
        target = "fake-c" if mode is SwapMode.DUAL else "fake-a"
        result = await server.orchestrator.swap(target, mode=mode)
        assert result.status is SwapOutcome.SUCCESS and result.mode is mode
        assert server.snapshot().model_id == target
        assert (await run_turn(server.service, "scout", "hi", model="fake-b")).text == "B here."
    assert fake_models["fake-b"].unloads == 0 and fake_models["fake-b"].loads == 1


def test_the_admin_api_loads_and_unloads_models_beside(make_client):
    client = make_client()
    headers = {"X-Admin-Key": FAST_ADMIN_KEY}

    def post(action: str, body: dict):
        return client.post(f"/admin/models/{action}", json=body, headers=headers)

    loaded = post("load", {"model_id": "fake-b"})
    assert loaded.status_code == 200 and loaded.json()["kind"] == "load"
    assert client.get("/health").json()["resident"] == ["fake-a", "fake-b"]
    chat = client.post("/v1/chat/completions", json={
        "model": "fake-b", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "fake-b"
    for action, body, status, code in (
            ("load", {"model_id": "fake-b"}, 409, "model_state_conflict"),
            ("unload", {"model_id": "fake-a"}, 409, "model_state_conflict"),
            ("load", {"model_id": "nope"}, 404, "model_not_found"),
            ("load", {"model": "fake-b"}, 400, "invalid_request")):
        response = post(action, body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    unloaded = post("unload", {"model_id": "fake-b"})
    assert unloaded.status_code == 200 and unloaded.json()["old_model_id"] == "fake-b"
    assert client.get("/health").json()["resident"] == ["fake-a"]
    gone = post("unload", {"model_id": "fake-b"})
    assert (gone.status_code, gone.json()["error"]["code"]) == (409, "model_not_loaded")
