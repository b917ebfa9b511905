"""Swapping models over the admin API: caches survive, bad targets are refused, restarts
restore agents from disk. Real server processes, the official client, httpx."""

from __future__ import annotations

import shutil

import httpx
import pytest

from semantic_server.cache.cache_file import agent_file_name
from tests.conftest import GEMMA, SMOLLM2
from tests.e2e.helpers import (
    ADMIN,
    DUAL_STEPS,
    GREEDY,
    HISTORY,
    KEY,
    SEQUENTIAL_STEPS,
    swap,
)
from tests.servers import ServerProcess


@pytest.fixture(scope="module")
def swap_server(models_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("agent-caches")
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(cache_dir)).start()
    server.cache_dir = cache_dir
    yield server
    server.stop()


def test_admin_key_is_required(swap_server, smol_server):
    url = f"{swap_server.url}/admin/models/current"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Admin-Key": "wrong"}).status_code == 401
    assert httpx.get(url, headers=ADMIN).status_code == 200
    # A server started without a key has its admin API off.
    off = httpx.get(f"{smol_server.url}/admin/models/current", headers=ADMIN)
    assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"


def test_unknown_model_fails_preflight_without_pausing(swap_server):
    before = httpx.get(f"{swap_server.url}/admin/swaps", headers=ADMIN).json()["data"]
    response = swap(swap_server, "no-such-model")
    assert response.status_code == 404
    assert httpx.get(f"{swap_server.url}/admin/swaps", headers=ADMIN).json()["data"] == before
    assert swap_server.health()["state"] == "ready"
    assert swap_server.health()["model"] == SMOLLM2


@pytest.mark.parametrize(("home", "away", "mode", "steps"), [
    (SMOLLM2, GEMMA, "dual", DUAL_STEPS), (GEMMA, SMOLLM2, "sequential", SEQUENTIAL_STEPS)])
def test_round_trip_restores_the_agent_cache(swap_server, home, away, mode, steps):
    if swap_server.health()["model"] != home:
        assert swap(swap_server, home).json()["status"] == "success"
    agent = swap_server.client(f"expedition-agent-{home}")
    # Longer than Gemma's 512-token window, so its rotating layers wrap before the swap.
    messages = [{"role": "user", "content": HISTORY[:len(HISTORY) // 2]
                 + "Summarise my notes in one sentence."}]
    first = agent.chat.completions.create(model=home, messages=messages, max_tokens=16,
                                          **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Where did the team camp?"}]
    history_tokens = first.usage.prompt_tokens + first.usage.completion_tokens
    assert history_tokens > 600
    # The same turn on a fresh agent: what a server that never swapped answers.
    reference = swap_server.client(f"expedition-reference-{home}").chat.completions.create(
        model=home, messages=messages, max_tokens=16, **GREEDY)

    there = swap(swap_server, away, mode=mode)
    assert there.status_code == 200, there.text
    body = there.json()
    assert body["status"] == "success" and body["evicted_agents"] >= 2
    assert body["mode"] == mode and [s["name"] for s in body["steps"]] == steps
    assert all(s["ok"] for s in body["steps"])
    # The old model's memory is back: what is active is the new model's weights.
    memory = httpx.get(f"{swap_server.url}/admin/models/current",
                       headers=ADMIN).json()["memory"]
    new_weights = body["memory"]["weights_new"]
    print(mode, "active after the swap", memory["mlx_active_bytes"], "new model", new_weights)
    assert abs(memory["mlx_active_bytes"] - new_weights) <= 0.05 * new_weights
    listing = httpx.get(f"{swap_server.url}/admin/agents", headers=ADMIN).json()
    cold = {a["agent_id"]: a for a in listing["cold"] if a["model_id"] == home}
    assert cold[f"expedition-agent-{home}"]["tokens"] >= history_tokens - 1
    assert cold[f"expedition-agent-{home}"]["state"] == "cold"
    # While the other model is loaded, the agent is served by it, from no cache of home's.
    visit = agent.chat.completions.create(
        model=away, messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=4, **GREEDY)
    assert visit.model == away and visit.usage.prompt_tokens_details.cached_tokens == 0

    back = swap(swap_server, home, mode=mode)
    assert back.status_code == 200 and back.json()["status"] == "success", back.text
    resumed = agent.chat.completions.create(model=home, messages=messages, max_tokens=16,
                                            **GREEDY)
    cached = resumed.usage.prompt_tokens_details.cached_tokens
    print(home, "history", history_tokens, "cached after round trip", cached)
    assert cached >= history_tokens - 4
    assert resumed.choices[0].message.content == reference.choices[0].message.content
    swaps = httpx.get(f"{swap_server.url}/admin/swaps", headers=ADMIN).json()["data"]
    assert [s["new_model_id"] for s in swaps[-2:]] == [away, home]


def test_cache_of_other_dims_is_rejected(swap_server):
    if swap_server.health()["model"] != SMOLLM2:
        assert swap(swap_server, SMOLLM2).json()["status"] == "success"
    agent_id = "dims-agent"
    client = swap_server.client(agent_id)
    client.chat.completions.create(model=SMOLLM2, messages=[{"role": "user", "content":
                                   "Tell me about whales."}], max_tokens=4, **GREEDY)
    assert swap(swap_server, GEMMA).json()["status"] == "success"
    # Plant the SmolLM2 cache file where Gemma's cache of this agent would be.
    current = httpx.get(f"{swap_server.url}/admin/models/current", headers=ADMIN).json()
    smol_file = next(p for p in swap_server.cache_dir.glob(f"*/{agent_file_name(agent_id)}")
                     if p.parent.name != current["tag"])
    shutil.copy(smol_file, swap_server.cache_dir / current["tag"] / smol_file.name)
    reply = client.chat.completions.create(model=GEMMA, messages=[{"role": "user", "content":
                                           "Tell me about whales."}], max_tokens=4, **GREEDY)
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    lookups = httpx.get(f"{swap_server.url}/admin/agents", headers=ADMIN).json()["lookups"]
    assert lookups.get("rejected", 0) >= 1
    reasons = list((swap_server.cache_dir / "quarantine").glob("*.reason.txt"))
    assert any("dims differ" in r.read_text() for r in reasons)
    assert swap(swap_server, SMOLLM2).json()["status"] == "success"


def test_restart_restores_from_disk(swap_server):
    agent_id = "restart-agent"
    messages = [{"role": "user", "content": HISTORY[:1500] + "What did the team measure?"}]
    first = swap_server.client(agent_id).chat.completions.create(
        model=SMOLLM2, messages=messages, max_tokens=8, **GREEDY)
    # SIGTERM: uvicorn shuts down gracefully (then re-raises the signal, hence -15), and the
    # lifespan writes every hot cache to disk first.
    assert swap_server.stop() in (0, -15)
    assert "hot agent caches to disk before exit" in swap_server.output()
    swap_server.start()
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And what did they count?"}]
    again = swap_server.client(agent_id).chat.completions.create(
        model=SMOLLM2, messages=messages, max_tokens=8, **GREEDY)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens + first.usage.completion_tokens - 4


def test_a_retry_past_gemmas_window_reuses_its_prompt(swap_server):
    # Gemma 3's sliding layers (512 tokens) wrap during a turn of about 700 tokens, and a
    # wrapped cache cannot be cut back: without the prompt checkpoint a retried turn (a
    # client retry, a regenerate) prefilled everything again (cached_tokens 0).
    if swap_server.health()["model"] != GEMMA:
        assert swap(swap_server, GEMMA).json()["status"] == "success"
    agent = swap_server.client("gemma-retrier")
    messages = [{"role": "user", "content": HISTORY[:len(HISTORY) // 2] + "Summarise."}]
    first = agent.chat.completions.create(model=GEMMA, messages=messages, max_tokens=8,
                                          **GREEDY)
    assert first.usage.prompt_tokens > 600  # past the 512-token window
    retry = agent.chat.completions.create(model=GEMMA, messages=messages, max_tokens=8,
                                          **GREEDY)
    cached = retry.usage.prompt_tokens_details.cached_tokens
    print("prompt", retry.usage.prompt_tokens, "cached on retry", cached)
    assert cached >= 0.9 * retry.usage.prompt_tokens
    assert retry.choices[0].message.content == first.choices[0].message.content
