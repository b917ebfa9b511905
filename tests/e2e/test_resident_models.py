"""Real models by request, through the official OpenAI client.

With room for both: the first request naming Gemma loads it beside SmolLM2; requests
naming either model then interleave, every agent warm on its next turn, with no swap; and
Gemma leaves once a request's ``keep_alive: 0`` lets it.

With room for one: agents of two models take turns at once; they are served in per-model
batches (one swap per change of model, no more), every agent is warm when its model
returns, and a pinned model is never made to leave.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from semantic_server.swap.orchestrator import LOAD_STEPS, UNLOAD_STEPS
from tests.conftest import GEMMA, SMOLLM2
from tests.e2e.helpers import ADMIN, KEY
from tests.polling import wait_for
from tests.servers import ServerProcess

QUESTION = "Here are my notes about the harbour, the lighthouse and the tides. Summarise them."


@pytest.fixture(scope="module")
def pair_server(models_dir):
    server = ServerProcess(SMOLLM2, admin_key=KEY, load_on_demand="true").start()
    yield server
    server.stop()


def admin(server: ServerProcess, action: str, model_id: str) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models/{action}", json={"model_id": model_id},
                      headers=ADMIN, timeout=600)


def turn(server: ServerProcess, model: str, agent: str, history: list[dict],
         **extra) -> tuple:
    """One agent turn: (reply, prompt tokens, cached tokens, the model that answered)."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                    default_headers={"X-Agent-ID": agent}, timeout=600)
    reply = client.chat.completions.create(model=model, messages=history, max_tokens=6,
                                           temperature=0, extra_body=extra)
    details = reply.usage.prompt_tokens_details
    return (reply.choices[0].message.content, reply.usage.prompt_tokens,
            (details.cached_tokens if details else 0) or 0, reply.model)


def test_two_models_serve_side_by_side_and_every_agent_stays_warm(pair_server):
    agents = {"planner": SMOLLM2, "scout": GEMMA}
    histories = {agent: [{"role": "user", "content": QUESTION}] for agent in agents}
    previous = {}
    for round_ in range(2):  # the two models' turns interleave
        for agent, model in agents.items():
            reply, prompt, cached, served = turn(pair_server, model, agent, histories[agent])
            assert served == model
            if round_:  # warm: its own model's cache, never evicted by the other model
                assert cached >= 0.9 * previous[agent], (agent, cached, previous[agent])
            previous[agent] = prompt
            histories[agent] += [{"role": "assistant", "content": reply},
                                 {"role": "user", "content": "Go on."}]
    swaps = httpx.get(f"{pair_server.url}/admin/swaps", headers=ADMIN).json()["data"]
    assert [s["kind"] for s in swaps] == ["load"]  # Gemma's first request; then no swap
    assert [s["name"] for s in swaps[0]["steps"]] == list(LOAD_STEPS)
    health = httpx.get(f"{pair_server.url}/health").json()
    assert health["model"] == SMOLLM2 and health["resident"] == [GEMMA, SMOLLM2]

    # A request's keep_alive 0: Gemma leaves as soon as it is idle, its agent's cache on disk
    turn(pair_server, GEMMA, "scout", histories["scout"], keep_alive=0)
    wait_for(lambda: len(httpx.get(f"{pair_server.url}/admin/swaps", headers=ADMIN)
                         .json()["data"]) == 2, timeout=60, what="Gemma's keep-alive unload")
    unloaded = httpx.get(f"{pair_server.url}/admin/swaps", headers=ADMIN).json()["data"][-1]
    assert unloaded["kind"] == "unload" and unloaded["old_model_id"] == GEMMA
    assert [s["name"] for s in unloaded["steps"]] == list(UNLOAD_STEPS)
    assert unloaded["evicted_agents"] == 1
    assert httpx.get(f"{pair_server.url}/health").json()["resident"] == [SMOLLM2]
    refused = admin(pair_server, "unload", SMOLLM2)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "model_state_conflict"


# Room for one SmolLM2 (its load needs about 0.9 GiB) but not for two (1.4 GiB).
ONE_SMOLLM2 = 1100 * 2**20


def test_with_room_for_one_agents_run_in_per_model_batches_and_stay_warm(twin):
    # The twin is as large as SmolLM2, so neither fits beside the other (Gemma, whose load
    # peaks at 2.3 GiB, would leave room for SmolLM2 beside it within any budget it fits).
    server = ServerProcess(SMOLLM2, admin_key=KEY, load_on_demand="true",
                           memory_budget_bytes=str(ONE_SMOLLM2), min_residency_seconds="1",
                           extra_models=json.dumps([str(twin)])).start()
    try:
        agents = {"planner": SMOLLM2, "scout-1": twin.name, "scout-2": twin.name}
        histories = {agent: [{"role": "user", "content": f"{agent}: {QUESTION}"}]
                     for agent in agents}
        previous: dict[str, int] = {}
        rounds = 3
        with ThreadPoolExecutor(len(agents)) as pool:
            for round_ in range(rounds):  # every agent's turn at once, each round
                replies = dict(zip(agents, pool.map(
                    lambda a: turn(server, agents[a], a, histories[a]), agents), strict=True))
                for agent, (reply, prompt, cached, served) in replies.items():
                    assert served == agents[agent]
                    if round_:  # warm when its model returns: its cache came back from disk
                        assert cached >= 0.9 * previous[agent], (agent, cached, previous)
                    previous[agent] = prompt
                    histories[agent] += [{"role": "assistant", "content": reply},
                                         {"role": "user", "content": "Go on."}]
        swaps = httpx.get(f"{server.url}/admin/swaps", headers=ADMIN).json()["data"]
        assert {s["kind"] for s in swaps} == {"swap"}  # never beside: there is no room
        assert all(s["status"] == "success" for s in swaps)
        # One swap per change of model, never one per request: a round changes model at
        # most twice (to the twin for both scouts, and back for the planner, in whichever
        # order their requests arrive), and the rounds after the first at least once.
        assert rounds <= len(swaps) <= 2 * rounds, [s["new_model_id"] for s in swaps]

        serving = httpx.get(f"{server.url}/health").json()["model"]
        other = SMOLLM2 if serving == twin.name else twin.name
        pinned = httpx.post(f"{server.url}/admin/models/pin", json={"model_id": serving},
                            headers=ADMIN)
        assert pinned.status_code == 200
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(Exception) as refused:  # the pinned model never leaves for it
            client.chat.completions.create(model=other, max_tokens=2, messages=[
                {"role": "user", "content": "hi"}])
        assert refused.value.status_code == 422 and "pinned" in str(refused.value)
        after = httpx.get(f"{server.url}/admin/swaps", headers=ADMIN).json()["data"]
        assert len(after) == len(swaps)
        assert httpx.get(f"{server.url}/health").json()["resident"] == [serving]
    finally:
        server.stop()
