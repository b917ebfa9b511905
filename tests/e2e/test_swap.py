"""Swapping models over the admin API: caches survive, bad targets are refused, restarts
restore agents from disk. Real server processes, the official client, httpx."""

from __future__ import annotations

import shutil

import httpx
import pytest

from semantic_server.cache.cache_file import agent_file_name
from tests.conftest import GEMMA, SMOLLM2
from tests.e2e.server import ServerProcess

KEY = "test-admin-key"
ADMIN = {"X-Admin-Key": KEY}
GREEDY = {"temperature": 0}
HISTORY = (
    "Here are my notes about the expedition. The team left the harbour at dawn, crossed "
    "the strait, and set up camp near the old lighthouse. They measured the tides, counted "
    "the birds on the cliffs and wrote down everything the fishermen told them. "
) * 30


@pytest.fixture(scope="module")
def swap_server(models_dir, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("agent-caches")
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(cache_dir)).start()
    server.cache_dir = cache_dir
    yield server
    server.stop()


def swap(server: ServerProcess, model_id: str, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models/swap", json={"model_id": model_id, **extra},
                      headers=ADMIN, timeout=600)


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
    assert swap_server.health()["status"] == "ready"
    assert swap_server.health()["model"] == SMOLLM2


def test_round_trip_restores_the_agent_cache(swap_server):
    agent = swap_server.client("expedition-agent")
    messages = [{"role": "user", "content": HISTORY + "Summarise my notes in one sentence."}]
    first = agent.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=16,
                                          **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Where did the team camp?"}]
    history_tokens = first.usage.prompt_tokens + first.usage.completion_tokens
    assert history_tokens > 1400
    # The same turn on a fresh agent: what a server that never swapped answers.
    reference = swap_server.client("expedition-reference").chat.completions.create(
        model=SMOLLM2, messages=messages, max_tokens=16, **GREEDY)

    away = swap(swap_server, GEMMA)
    assert away.status_code == 200, away.text
    body = away.json()
    assert body["status"] == "success" and body["evicted_agents"] >= 2
    assert [s["name"] for s in body["steps"]] == ["drain", "evict", "shutdown", "unload",
                                                 "load", "reconfigure", "retag", "reinit"]
    assert all(s["ok"] for s in body["steps"])
    # While Gemma is loaded, a Gemma request is served and loads no SmolLM2 cache.
    gemma = swap_server.client("expedition-agent").chat.completions.create(
        model=GEMMA, messages=[{"role": "user", "content": "The capital of France is"}],
        max_tokens=4, **GREEDY)
    assert gemma.model == GEMMA and gemma.usage.prompt_tokens_details.cached_tokens == 0

    back = swap(swap_server, SMOLLM2)
    assert back.status_code == 200 and back.json()["status"] == "success", back.text
    resumed = agent.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=16,
                                            **GREEDY)
    cached = resumed.usage.prompt_tokens_details.cached_tokens
    print("history", history_tokens, "cached after round trip", cached)
    assert cached >= history_tokens - 4
    assert resumed.choices[0].message.content == reference.choices[0].message.content
    swaps = httpx.get(f"{swap_server.url}/admin/swaps", headers=ADMIN).json()["data"]
    assert [s["new_model_id"] for s in swaps[-2:]] == [GEMMA, SMOLLM2]


def test_cache_of_other_dims_is_rejected(swap_server):
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
