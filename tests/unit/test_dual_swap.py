"""The dual path of the swap (ADR-013), in process over fake models: the target loads
beside the serving model slice by slice, nobody is held, requests admitted before the
promotion finish on the old model, a target that fails never disturbs serving, and the
memory budget decides which path runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from semantic_server.engine.batch_engine import SHARED_PREFIX
from semantic_server.engine.gate import ServerState
from semantic_server.errors import ModelTooLarge, SwapInProgress
from semantic_server.swap.orchestrator import DUAL_STEPS
from semantic_server.swap_result import SwapMode, SwapOutcome, SwapStep
from tests.fakes import WEIGHT_BYTES, block_cache_writes, run_turn
from tests.polling import wait_until

pytestmark = pytest.mark.anyio


def _serving(server) -> list[tuple[str, str]]:
    return [(v.model_id, v.state) for v in server.snapshot().versions]


async def test_nobody_is_held_and_old_requests_finish_on_the_old_model(server, fake_models):
    first = await run_turn(server.service, "keeper", "Remember this")
    await run_turn(server.service, None, "an anonymous prompt fills A's prefix cache")
    (model_a,) = server.registry.resident
    assert server.pool.reservation((SHARED_PREFIX, model_a.version)) > 0
    fake_models["fake-b"].load_gate = threading.Event()  # the load goes on until released
    swapping = asyncio.create_task(server.orchestrator.swap("fake-b"))
    await wait_until(lambda: fake_models["fake-b"].loads == 1)
    during = await run_turn(server.service, None, "still there?")  # served while B loads
    assert during.admitted.model_id == "fake-a" and server.gate.held == 0
    assert server.snapshot().swapping == "dual" and server.gate.state is ServerState.READY

    fake_models["fake-a"].step_gate = threading.Event()  # a request stays in flight on A
    old = asyncio.create_task(run_turn(server.service, "keeper", "Remember this"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    fake_models["fake-b"].load_gate.set()
    await wait_until(lambda: _serving(server) == [("fake-b", "serving"), ("fake-a", "retiring")])
    new = await run_turn(server.service, None, "who is this?")  # A's request still runs
    assert new.admitted.model_id == "fake-b" and new.text == "B here."
    assert not old.done() and fake_models["fake-a"].unloads == 0

    fake_models["fake-a"].step_gate.set()
    finished = await old
    assert finished.admitted.model_id == "fake-a" and finished.text == "Hello from A."
    assert finished.outcome.cached_tokens == first.outcome.prompt_tokens - 1
    result = await swapping
    assert result.status is SwapOutcome.SUCCESS and result.mode is SwapMode.DUAL
    assert [(t.name, t.ok) for t in result.steps] == [(step, True) for step in DUAL_STEPS]
    assert result.promotion_pause_ms is not None and result.evicted_agents == 1
    assert fake_models["fake-a"].unloads == 1 and _serving(server) == [("fake-b", "serving")]
    assert [m.model_id for m in server.registry.resident] == ["fake-b"]
    assert server.pool.reservation((SHARED_PREFIX, model_a.version)) == 0
    assert server.snapshot().swapping is None

    # The agent's next turn runs on B, from scratch; its A cache waits on disk for A.
    on_b = await run_turn(server.service, "keeper", "Remember this")
    assert on_b.admitted.model_id == "fake-b" and on_b.outcome.cached_tokens == 0
    back = await server.orchestrator.swap("fake-a")
    assert back.status is SwapOutcome.SUCCESS and back.mode is SwapMode.DUAL
    again = await run_turn(server.service, "keeper", "Remember this")
    assert again.outcome.cached_tokens == finished.outcome.prompt_tokens - 1
    samples = server.metrics.registry.get_sample_value
    assert samples("semantic_swaps_total", {"result": "success", "mode": "dual"}) == 2
    assert samples("semantic_swap_promotion_pause_seconds_count", {}) == 2


@pytest.mark.parametrize(("failure", "step"), [("fail", SwapStep.LOAD), ("nan", SwapStep.LOAD),
                                                ("unhealthy", SwapStep.WARM)])
async def test_a_failing_target_leaves_serving_untouched(server, fake_models, failure, step):
    if failure == "unhealthy":
        fake_models["fake-b"].unhealthy = True
    else:
        fake_models["fake-b"].load = failure
    await run_turn(server.service, "survivor", "hold on")
    fake_models["fake-a"].step_gate = threading.Event()
    running = asyncio.create_task(run_turn(server.service, "runner", "go on"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    result = await server.orchestrator.swap("fake-b")
    assert result.status is SwapOutcome.ROLLED_BACK and result.failed_step is step
    assert result.rollback_steps == [] and not running.done()  # the request never noticed
    fake_models["fake-a"].step_gate.set()
    assert (await running).text == "Hello from A."
    again = await run_turn(server.service, "survivor", "hold on")
    assert again.admitted.model_id == "fake-a" and again.outcome.cached_tokens > 0  # hot
    assert server.store.lookups["disk"] == 0 and fake_models["fake-a"].unloads == 0
    assert [m.model_id for m in server.registry.resident] == ["fake-a"]
    assert _serving(server) == [("fake-a", "serving")]
    assert fake_models["fake-b"].unloads == (1 if failure == "unhealthy" else 0)


async def test_the_memory_budget_picks_the_path(start, fake_models):
    # fake-a holds WEIGHT_BYTES; fake-b needs a tenth more for its warm-up.
    server = await start(memory_budget_bytes=2 * WEIGHT_BYTES)
    with pytest.raises(ModelTooLarge, match="beside"):
        await server.orchestrator.swap("fake-b", mode=SwapMode.DUAL)
    assert fake_models["fake-b"].loads == 0 and not server.orchestrator.history
    auto = await server.orchestrator.swap("fake-b")
    assert auto.status is SwapOutcome.SUCCESS and auto.mode is SwapMode.SEQUENTIAL
    assert auto.steps[0].name is SwapStep.DRAIN
    small = await start(memory_budget_bytes=WEIGHT_BYTES)
    for mode in SwapMode:
        with pytest.raises(ModelTooLarge, match="memory budget"):
            await small.orchestrator.swap("fake-b", mode=mode)


async def test_a_second_swap_during_a_dual_swap_is_refused(server, fake_models):
    fake_models["fake-b"].load_gate = threading.Event()
    first = asyncio.create_task(server.orchestrator.swap("fake-b"))
    await wait_until(lambda: fake_models["fake-b"].loads == 1)
    for mode in SwapMode:
        with pytest.raises(SwapInProgress):
            await server.orchestrator.swap("fake-a", mode=mode)
    fake_models["fake-b"].load_gate.set()
    assert (await first).status is SwapOutcome.SUCCESS


async def test_with_nothing_serving_only_the_sequential_path_runs(server, fake_models):
    fake_models["fake-b"].load = fake_models["fake-a"].load = "fail"
    degraded = await server.orchestrator.swap("fake-b", mode=SwapMode.SEQUENTIAL)
    assert degraded.status is SwapOutcome.DEGRADED
    fake_models["fake-b"].load = "ok"
    with pytest.raises(ModelTooLarge, match="nothing to load beside"):
        await server.orchestrator.swap("fake-b", mode=SwapMode.DUAL)
    recovered = await server.orchestrator.swap("fake-b")
    assert recovered.status is SwapOutcome.SUCCESS and recovered.mode is SwapMode.SEQUENTIAL


async def test_caches_that_cannot_be_written_after_promotion_stay_hot(server, fake_models,
                                                                       tmp_path):
    await run_turn(server.service, "writer", "keep me")
    tag_folder = block_cache_writes(tmp_path / "caches", server.snapshot().tag)
    result = await server.orchestrator.swap("fake-b")
    assert result.status is SwapOutcome.SUCCESS and "stay in memory" in result.message
    assert [(t.name, t.ok) for t in result.steps if t.name is SwapStep.EVICT] == [
        (SwapStep.EVICT, False)]
    assert [(c.agent_id, c.tag.model_id) for c in server.store.hot_agents()] == [
        ("writer", "fake-a")]
    tag_folder.unlink()
    assert (await server.orchestrator.swap("fake-a")).status is SwapOutcome.SUCCESS
    again = await run_turn(server.service, "writer", "keep me")
    assert again.outcome.cached_tokens > 0 and server.store.lookups["hot"] == 1


async def test_a_swap_to_the_serving_model_shares_its_tag_and_caches(server, fake_models):
    # The same weights load beside themselves (a reload): one cache tag for both loads,
    # so the old load's leaving must not take the tag the new one serves under.
    first = await run_turn(server.service, "same", "Remember this")
    result = await server.orchestrator.swap("fake-a")
    assert result.status is SwapOutcome.SUCCESS and result.mode is SwapMode.DUAL
    again = await run_turn(server.service, "same", "Remember this")
    assert again.admitted.model_id == "fake-a"
    assert again.outcome.cached_tokens == first.outcome.prompt_tokens - 1  # from disk
    assert fake_models["fake-a"].loads == 2 and fake_models["fake-a"].unloads == 1


async def test_a_failed_reload_of_the_serving_model_leaves_it_serving(server, fake_models):
    # The target shares the serving model's tag: undoing the failed load must not take
    # the serving model's tag (or its hot caches) with it.
    first = await run_turn(server.service, "stays", "Remember this")
    fake_models["fake-a"].unhealthy = True
    result = await server.orchestrator.swap("fake-a")
    assert result.status is SwapOutcome.ROLLED_BACK and result.failed_step is SwapStep.WARM
    assert len(server.registry.resident) == 1 and fake_models["fake-a"].unloads == 1
    again = await run_turn(server.service, "stays", "Remember this")
    assert again.outcome.cached_tokens == first.outcome.prompt_tokens - 1  # still hot
    assert server.store.lookups["hot"] == 1


async def test_requests_that_outlast_the_timeout_are_cut_and_the_old_model_goes(server,
                                                                                 fake_models):
    fake_models["fake-a"].step_gate = threading.Event()  # a request that never ends
    stuck = asyncio.create_task(run_turn(server.service, "slow", "go on"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    result = await server.orchestrator.swap("fake-b", timeout_seconds=0.2)
    assert result.status is SwapOutcome.SUCCESS and "1 requests" in result.message
    assert all(step.ok for step in result.steps)
    assert (await stuck).outcome.finish_reason == "cancelled"
    assert fake_models["fake-a"].unloads == 1 and _serving(server) == [("fake-b", "serving")]
    assert server.pool.reserved == 0
