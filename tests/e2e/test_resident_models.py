"""Two real models resident side by side, by request: with load on demand, the first
request naming Gemma loads it beside SmolLM2; requests naming either model then interleave
through the official OpenAI client, every agent warm on its next turn, with no swap; and
Gemma is unloaded again over the admin API without holding anyone."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from experiments.servers import ServerProcess
from semantic_server.swap.orchestrator import LOAD_STEPS, UNLOAD_STEPS
from tests.conftest import GEMMA, SMOLLM2
from tests.e2e.helpers import ADMIN, KEY

QUESTION = "Here are my notes about the harbour, the lighthouse and the tides. Summarise them."


@pytest.fixture(scope="module")
def pair_server(models_dir):
    server = ServerProcess(SMOLLM2, admin_key=KEY, load_on_demand="true").start()
    yield server
    server.stop()


def admin(server: ServerProcess, action: str, model_id: str) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models/{action}", json={"model_id": model_id},
                      headers=ADMIN, timeout=600)


def turn(server: ServerProcess, model: str, agent: str, history: list[dict]) -> tuple:
    """One agent turn: (reply, prompt tokens, cached tokens, the model that answered)."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                    default_headers={"X-Agent-ID": agent})
    reply = client.chat.completions.create(model=model, messages=history, max_tokens=6,
                                           temperature=0)
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

    unloaded = admin(pair_server, "unload", GEMMA)
    assert unloaded.status_code == 200, unloaded.text
    assert [s["name"] for s in unloaded.json()["steps"]] == list(UNLOAD_STEPS)
    assert unloaded.json()["evicted_agents"] == 1
    assert httpx.get(f"{pair_server.url}/health").json()["resident"] == [SMOLLM2]
    refused = admin(pair_server, "unload", SMOLLM2)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "model_state_conflict"
