"""Load on demand (SEMANTIC_LOAD_ON_DEMAND), in process over fake models: a request naming a
model that is not resident loads it (beside when it fits, else in place of the least
recently used model that may leave), one load serves its whole queue, a minimum residency
bounds the swaps, pinned models never leave, idle models unload after their keep-alive
(the server's, or the one the last request asked for), and what can never work is
refused at once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from semantic_server.errors import (
    ModelLoadFailed,
    ModelNotFound,
    ModelNotLoaded,
    ModelTooLarge,
    QueueFull,
    ServerBusy,
)
from semantic_server.swap_result import SwapKind
from tests.fakes import WEIGHT_BYTES, FakeModel, run_turn, write_model_dirs
from tests.polling import wait_for, wait_until
from tests.unit.conftest import FAST_ADMIN_KEY

pytestmark = pytest.mark.anyio
ONE_MODEL = WEIGHT_BYTES * 3 // 2  # a memory budget with room for one fake model
TWO_MODELS = WEIGHT_BYTES * 5 // 2


@pytest.fixture
def three(fake_models, tmp_path):
    fake_models["fake-c"] = FakeModel(reply="C speaking.")
    write_model_dirs(tmp_path / "models", ["fake-c"])
    return fake_models


def _kinds(server) -> list[str]:
    return [r.kind.value for r in server.orchestrator.history]


async def test_off_by_default_a_request_never_loads_a_model(server):
    with pytest.raises(ModelNotLoaded):
        await run_turn(server.service, "a", "hi", model="fake-b")
    assert _kinds(server) == []


async def test_a_model_that_fits_loads_beside_once_for_its_whole_queue(start, fake_models):
    server = await start(load_on_demand=True)
    fake_models["fake-b"].load_gate = threading.Event()
    queued = [asyncio.create_task(run_turn(server.service, f"scout-{i}", "Look", model="fake-b"))
              for i in range(3)]
    await wait_until(lambda: server.residency.waiting["fake-b"] == 3)
    served = await run_turn(server.service, "planner", "Plan")  # the default serves on
    assert served.admitted.model_id == "fake-a" and not any(t.done() for t in queued)
    fake_models["fake-b"].load_gate.set()
    assert [(await t).text for t in queued] == ["B here."] * 3
    assert fake_models["fake-b"].loads == 1 and _kinds(server) == ["load"]
    again = await run_turn(server.service, "scout-0", "Look", model="fake-b")
    assert again.outcome.cached_tokens == again.outcome.prompt_tokens - 1  # warm
    assert _kinds(server) == ["load"]  # resident: no more loads


async def test_with_room_for_one_alternating_models_swap_and_every_agent_stays_warm(start):
    server = await start(load_on_demand=True, memory_budget_bytes=ONE_MODEL,
                         min_residency_seconds=0)
    first = {m: await run_turn(server.service, f"agent-{m}", "Remember me", model=m)
             for m in ("fake-b", "fake-a")}
    assert [r.admitted.model_id for r in first.values()] == ["fake-b", "fake-a"]
    for model in ("fake-b", "fake-a"):  # each returns: its agent's cache comes back
        turn = await run_turn(server.service, f"agent-{model}", "Remember me", model=model)
        assert turn.outcome.cached_tokens == turn.outcome.prompt_tokens - 1
    assert _kinds(server) == ["swap"] * 4  # one per change of model, none more
    assert server.snapshot().model_id == "fake-a"


async def test_a_model_that_left_while_its_request_waited_is_brought_back(start, fake_models):
    server = await start(load_on_demand=True, memory_budget_bytes=ONE_MODEL,
                         min_residency_seconds=0)
    await run_turn(server.service, "scout", "Look", model="fake-b")
    fake_models["fake-b"].step_gate = threading.Event()
    first = asyncio.create_task(run_turn(server.service, "scout", "Look", model="fake-b"))
    await wait_until(lambda: server.versions.serving.pins == 1)
    # fake-b is resident as the scout's next request arrives, which then waits its turn...
    second = asyncio.create_task(run_turn(server.service, "scout", "Look", model="fake-b"))
    await wait_until(lambda: server.service._agent_locks["scout"].count == 2)
    # ...while the planner's request makes fake-b leave
    planner = asyncio.create_task(run_turn(server.service, "planner", "Plan", model="fake-a"))
    await wait_until(lambda: server.orchestrator.swapping is not None)
    fake_models["fake-b"].step_gate.set()
    assert (await planner).text == "Hello from A."
    assert (await second).text == "B here."  # brought back, not a 409
    await first
    assert _kinds(server) == ["swap"] * 3 and fake_models["fake-b"].loads == 2


async def test_minimum_residency_holds_a_model_against_the_next(start):
    server = await start(load_on_demand=True, memory_budget_bytes=ONE_MODEL,
                         min_residency_seconds=60, swap_hold_seconds=0.3)
    await run_turn(server.service, "b", "hi", model="fake-b")  # fake-a had been there long
    with pytest.raises(ServerBusy):  # fake-b arrived just now: it stays
        await run_turn(server.service, "a", "hi", model="fake-a")
    assert _kinds(server) == ["swap"] and server.snapshot().model_id == "fake-b"


async def test_the_least_recently_used_model_leaves_and_pinned_ones_never(start, three):
    server = await start(load_on_demand=True, memory_budget_bytes=TWO_MODELS,
                         min_residency_seconds=0, pinned_models=["fake-a"])
    await run_turn(server.service, "b", "hi", model="fake-b")  # beside fake-a
    await run_turn(server.service, "a", "hi", model="fake-a")  # fake-a is more recent...
    await run_turn(server.service, "c", "hi", model="fake-c")  # ...but pinned anyway
    assert _kinds(server) == ["load", "unload", "load"]
    assert server.orchestrator.history[1].old_model_id == "fake-b"
    assert sorted(server.versions.live_models()) == ["fake-a", "fake-c"]
    await run_turn(server.service, "b", "hi", model="fake-b")  # fake-c leaves, never fake-a
    assert sorted(server.versions.live_models()) == ["fake-a", "fake-b"]
    assert three["fake-a"].unloads == 0


async def test_an_idle_model_unloads_after_its_keep_alive(start):
    server = await start(load_on_demand=True, keep_alive_seconds=0.2)
    await run_turn(server.service, "b", "hi", model="fake-b")
    assert server.versions.live_models() == ["fake-a", "fake-b"]
    await wait_until(lambda: _kinds(server)[-1] == SwapKind.UNLOAD.value, timeout=10)
    assert server.versions.live_models() == ["fake-a"]  # the serving model stays
    assert server.orchestrator.history[-1].old_model_id == "fake-b"


async def test_a_request_sets_its_models_keep_alive(start, fake_models):
    server = await start(load_on_demand=True, keep_alive_seconds=0.01)
    await run_turn(server.service, "b", "hi", model="fake-b", keep_alive=-1)
    assert server.residency.keep_alive_of["fake-b"] == -1
    assert server.residency._expiry("fake-b") is None  # for good: never due
    await run_turn(server.service, "b", "hi", model="fake-b", keep_alive=3600)
    assert server.residency.due()[0] == [] and _kinds(server) == ["load"]
    fake_models["fake-b"].step_gate = threading.Event()
    running = asyncio.create_task(
        run_turn(server.service, "b", "hi", model="fake-b", keep_alive=0))
    await wait_until(lambda: server.versions.beside["fake-b"].pins == 1)
    server.residency.keep_alive_of["fake-b"] = 0  # past its keep-alive, but in use:
    assert server.residency.due()[0] == []  # never idle while a request runs on it
    fake_models["fake-b"].step_gate.set()
    await running
    await wait_until(lambda: _kinds(server) == ["load", "unload"], timeout=10)  # 0: once idle
    assert server.versions.live_models() == ["fake-a"]
    await run_turn(server.service, "b", "hi", model="fake-b")  # no keep_alive: the default
    assert "fake-b" not in server.residency.keep_alive_of
    await wait_until(lambda: _kinds(server) == ["load", "unload", "load", "unload"], timeout=10)


async def test_keep_alive_unloads_a_model_loaded_over_the_admin_api(start):
    server = await start(keep_alive_seconds=0.2)  # load on demand off
    await server.orchestrator.load("fake-b")
    await run_turn(server.service, "b", "hi", model="fake-b")
    await wait_until(lambda: _kinds(server)[-1] == SwapKind.UNLOAD.value, timeout=10)
    assert server.versions.live_models() == ["fake-a"]


def test_pins_over_the_admin_api(make_client):
    client = make_client(load_on_demand=True, keep_alive_seconds=0.2)
    admin = {"X-Admin-Key": FAST_ADMIN_KEY}
    pinned = client.post("/admin/models/pin", json={"model_id": "fake-b"}, headers=admin)
    assert pinned.status_code == 200
    assert pinned.json() == {"model_id": "fake-b", "pinned": True, "pinned_models": ["fake-b"]}
    chat = {"model": "fake-b", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.get("/health").json()["pinned"] == ["fake-b"]
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["fake-b"]["pinned"] and not models["fake-a"]["pinned"]
    server = client.app.state.server
    assert server.residency._expiry("fake-b") is None  # pinned: never due
    assert client.post("/admin/models/unpin", json={"model_id": "fake-b"},
                       headers=admin).json()["pinned_models"] == []
    # unpinned, idle past its keep-alive: unloaded
    wait_for(lambda: client.get("/health").json()["resident"] == ["fake-a"], timeout=10)
    unknown = client.post("/admin/models/pin", json={"model_id": "nope"}, headers=admin)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert client.post("/admin/models/pin", json={"model_id": "fake-b"}).status_code == 401


@pytest.mark.parametrize("keep_alive", ["forever", "5 min", "nan", [1]])
def test_a_keep_alive_that_is_not_a_duration_is_a_400(make_client, keep_alive):
    client = make_client()
    chat = {"messages": [{"role": "user", "content": "hi"}], "keep_alive": keep_alive}
    refused = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and "keep_alive" in refused.text
    message = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
               "keep_alive": keep_alive}
    assert client.post("/v1/messages", json=message).status_code == 400


async def test_what_can_never_work_is_refused_at_once(start, fake_models):
    server = await start(load_on_demand=True, memory_budget_bytes=WEIGHT_BYTES // 2 + 1)
    with pytest.raises(ModelNotFound):
        await run_turn(server.service, "x", "hi", model="no-such-model")
    with pytest.raises(ModelTooLarge):  # fits nowhere, even alone: no queue, no swap
        await run_turn(server.service, "x", "hi", model="fake-b")
    assert _kinds(server) == [] and fake_models["fake-b"].loads == 0
    roomy = await start(load_on_demand=True)
    fake_models["fake-b"].load = "fail"
    with pytest.raises(ModelLoadFailed, match="fake-b"):
        await run_turn(roomy.service, "x", "hi", model="fake-b")
    served = await run_turn(roomy.service, "y", "hi")  # the others keep serving
    assert served.text == "Hello from A."


async def test_a_full_model_queue_is_a_429(start, fake_models):
    server = await start(load_on_demand=True, max_model_queue=2)
    fake_models["fake-b"].load_gate = threading.Event()
    queued = [asyncio.create_task(run_turn(server.service, f"s{i}", "Look", model="fake-b"))
              for i in range(2)]
    await wait_until(lambda: server.residency.waiting["fake-b"] == 2)
    with pytest.raises(QueueFull) as full:
        await run_turn(server.service, "s2", "Look", model="fake-b")
    assert full.value.retry_after > 0
    fake_models["fake-b"].load_gate.set()
    assert [(await t).text for t in queued] == ["B here."] * 2


def test_a_keep_alive_without_load_on_demand_is_a_400(make_client):
    client = make_client()  # load on demand off: only an admin changes models
    chat = {"messages": [{"role": "user", "content": "hi"}], "keep_alive": "5m"}
    refused = client.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 400 and "SEMANTIC_LOAD_ON_DEMAND" in refused.text
    assert refused.json()["error"]["param"] == "keep_alive"
