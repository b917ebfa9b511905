"""Every branch of the sequential swap, in process, over fake models whose loads succeed,
fail or hang on request: success, a drain that times out, caches that cannot be written, a
target that fails to load, a rollback that fails too, and a second swap during a swap.
Each ends in the history and the metrics with its outcome; no agent's cache is lost. (The
dual path's branches are in test_dual_swap.py.)"""

from __future__ import annotations

import asyncio
import threading

import pytest

from semantic_server.engine.gate import ServerState
from semantic_server.errors import (
    ModelNotFound,
    ModelNotLoaded,
    ServiceDegraded,
    SwapInProgress,
)
from semantic_server.swap.orchestrator import SEQUENTIAL_STEPS
from semantic_server.swap_result import SwapMode, SwapOutcome, SwapStep
from tests.fakes import block_cache_writes, run_turn
from tests.polling import wait_until

pytestmark = pytest.mark.anyio
SEQUENTIAL = SwapMode.SEQUENTIAL


def _steps(timings) -> list[tuple[SwapStep, bool]]:
    return [(t.name, t.ok) for t in timings]


def _swaps_counted(server, outcome: SwapOutcome) -> float:
    return server.metrics.registry.get_sample_value(
        "semantic_swaps_total", {"result": outcome.value, "mode": "sequential"}) or 0.0


async def test_startup_runs_the_bring_up_steps(server, fake_models):
    assert fake_models["fake-a"].loads == 1 and server.snapshot().model_id == "fake-a"
    assert server.snapshot().tag is not None and server.pool.budget_bytes > 0
    assert [v.model_id for v in server.snapshot().versions] == ["fake-a"]


async def test_a_swap_runs_the_eight_steps_and_keeps_every_cache(server, fake_models):
    first = await run_turn(server.service, "keeper", "Remember this")
    result = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert result.status is SwapOutcome.SUCCESS and result.evicted_agents == 1
    assert _steps(result.steps) == [(step, True) for step in SEQUENTIAL_STEPS]
    assert result.mode is SwapMode.SEQUENTIAL and result.promotion_pause_ms is None
    assert fake_models["fake-a"].unloads == 1 and fake_models["fake-b"].loads == 1
    on_b = await run_turn(server.service, "keeper", "Remember this")
    assert on_b.admitted.model_id == "fake-b" and on_b.outcome.cached_tokens == 0

    back = await server.orchestrator.swap("fake-a", mode=SEQUENTIAL)
    assert back.status is SwapOutcome.SUCCESS
    again = await run_turn(server.service, "keeper", "Remember this")
    # the turn-1 cache came back from disk under fake-a's tag
    assert again.outcome.cached_tokens == first.outcome.prompt_tokens - 1
    assert list(server.orchestrator.history) == [result, back]
    assert _swaps_counted(server, SwapOutcome.SUCCESS) == 2


async def test_a_preflight_refusal_changes_nothing(server):
    with pytest.raises(ModelNotFound):
        await server.orchestrator.swap("no-such-model")
    assert server.gate.state is ServerState.READY and not server.orchestrator.history


async def test_a_drain_timeout_aborts_and_is_recorded(server, fake_models):
    fake_models["fake-a"].step_gate = threading.Event()  # the request stays in flight
    running = asyncio.create_task(run_turn(server.service, "busy", "go"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    result = await server.orchestrator.swap("fake-b", timeout_seconds=0.05, mode=SEQUENTIAL)
    assert result.status is SwapOutcome.ABORTED and result.failed_step is SwapStep.DRAIN
    assert _steps(result.steps) == [(SwapStep.DRAIN, False)]
    assert server.gate.state is ServerState.READY and fake_models["fake-b"].loads == 0
    fake_models["fake-a"].step_gate.set()
    assert (await running).admitted.model_id == "fake-a"
    assert server.orchestrator.history[-1] is result
    assert _swaps_counted(server, SwapOutcome.ABORTED) == 1


async def test_caches_that_cannot_be_written_abort_before_unloading(server, fake_models,
                                                                     tmp_path):
    await run_turn(server.service, "writer", "keep me")
    tag_folder = block_cache_writes(tmp_path / "caches", server.snapshot().tag)
    result = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert result.status is SwapOutcome.ABORTED and result.failed_step is SwapStep.EVICT
    assert fake_models["fake-a"].unloads == 0 and server.snapshot().model_id == "fake-a"
    assert [cache.agent_id for cache in server.store.hot_agents()] == ["writer"]
    tag_folder.unlink()
    again = await run_turn(server.service, "writer", "keep me")
    assert again.outcome.cached_tokens > 0  # still hot: nothing was lost
    assert _swaps_counted(server, SwapOutcome.ABORTED) == 1


@pytest.mark.parametrize("failure", ["fail", "nan"])
async def test_a_target_that_fails_to_load_rolls_back(server, fake_models, failure):
    fake_models["fake-b"].load = failure
    await run_turn(server.service, "survivor", "hold on")
    result = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert result.status is SwapOutcome.ROLLED_BACK and result.failed_step is SwapStep.LOAD
    assert _steps(result.steps)[-1] == (SwapStep.LOAD, False)
    assert _steps(result.rollback_steps) == [
        (SwapStep.LOAD, True), (SwapStep.RECONFIGURE, True), (SwapStep.RETAG, True),
        (SwapStep.REINIT, True)]
    assert server.gate.state is ServerState.READY and server.snapshot().model_id == "fake-a"
    again = await run_turn(server.service, "survivor", "hold on")
    assert again.outcome.cached_tokens > 0  # its cache came back from disk
    assert _swaps_counted(server, SwapOutcome.ROLLED_BACK) == 1


async def test_a_failed_rollback_degrades_until_a_good_swap(server, fake_models):
    fake_models["fake-b"].load = "fail"
    fake_models["fake-a"].load = "fail"  # the old model's files went bad meanwhile
    result = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert result.status is SwapOutcome.DEGRADED
    assert server.gate.state is ServerState.DEGRADED and "rollback" in server.gate.degraded_reason
    with pytest.raises(ServiceDegraded):
        await run_turn(server.service, None, "anyone?")
    fake_models["fake-b"].load = "ok"
    recovered = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert recovered.status is SwapOutcome.SUCCESS and server.gate.state is ServerState.READY
    assert (await run_turn(server.service, None, "hi")).text == "B here."


async def test_a_second_swap_during_a_swap_is_refused(server, fake_models):
    fake_models["fake-b"].load_gate = threading.Event()  # the load hangs until released
    first = asyncio.create_task(server.orchestrator.swap("fake-b", mode=SEQUENTIAL))
    await wait_until(lambda: fake_models["fake-b"].loads == 1)
    with pytest.raises(SwapInProgress):
        await server.orchestrator.swap("fake-a", mode=SEQUENTIAL)
    held = asyncio.create_task(run_turn(server.service, None, "wait for me", model="fake-b"))
    old = asyncio.create_task(run_turn(server.service, None, "too late", model="fake-a"))
    await wait_until(lambda: server.gate.held == 2)
    fake_models["fake-b"].load_gate.set()
    assert (await first).status is SwapOutcome.SUCCESS
    assert (await held).admitted.model_id == "fake-b"  # held, then run on the target
    with pytest.raises(ModelNotLoaded):
        await old  # named the model swapped out: 409, never run on fake-b


@pytest.mark.parametrize(("reuse", "reused"), [("exact", False), ("dims", True)])
async def test_caches_of_other_weights_are_reused_only_when_asked(start, reuse, reused):
    # fake-a and fake-b have equal dims and other fingerprints: other weights, same shape.
    server = await start(cache_reuse=reuse)
    await run_turn(server.service, "variant-agent", "List the planets.")
    assert (await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)).status is SwapOutcome.SUCCESS
    on_b = await run_turn(server.service, "variant-agent", "List the planets.")
    assert (on_b.outcome.cached_tokens > 0) is reused


async def test_a_failed_shutdown_rolls_back_instead_of_sticking(server, monkeypatch):
    # No real input makes detaching the generator fail, so the fault is injected (a
    # stand-in for the engine's detach only); what is tested is that the swap ends.
    def broken_detach() -> None:
        raise RuntimeError("injected: the generator would not close")

    monkeypatch.setattr(server.engine, "detach", broken_detach)
    result = await server.orchestrator.swap("fake-b", mode=SEQUENTIAL)
    assert result.status in (SwapOutcome.ROLLED_BACK, SwapOutcome.DEGRADED)
    assert result.failed_step is SwapStep.SHUTDOWN
    assert server.gate.state is not ServerState.SWAPPING
    assert server.orchestrator.history[-1] is result
