"""Swaps that fail, for real: broken weights, a failing warm-up, a failing rollback, a disk
that refuses the evicted caches. The server must keep serving (or say clearly that it
cannot), and no agent cache may be lost. (A drain that times out, a second swap during a
swap and requests held past the limit are swap logic, tested in the fast tier.)"""

from __future__ import annotations

import json
import math
import shutil

import httpx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from semantic_server.cache.cache_file import agent_file_name, read_summary
from tests.conftest import SMOLLM2
from tests.e2e.helpers import ADMIN, GREEDY, HISTORY, KEY, scrape, swap, value
from tests.servers import ServerProcess


def _copy_model(source, dest):
    shutil.copytree(source, dest)
    return dest


def _poison(model_dir, value):
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["model.norm.weight"] = np.full_like(weights["model.norm.weight"], value)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "mlx"})


@pytest.fixture(scope="module")
def fragile_server(models_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    fragile = _copy_model(models_dir / SMOLLM2, root / "fragile")
    broken = _copy_model(models_dir / SMOLLM2, root / "broken-weights")
    # its header whole (the preflight reads it) and half its data: the load itself fails
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    nan = _copy_model(models_dir / SMOLLM2, root / "nan-weights")
    _poison(nan, math.nan)
    extra = json.dumps([str(fragile), str(broken), str(nan)])
    server = ServerProcess("fragile", admin_key=KEY, extra_models=extra,
                           cache_dir=str(tmp_path_factory.mktemp("fault-caches"))).start()
    server.fragile = fragile
    yield server
    server.stop()


def _agent_turns(server, agent_id):
    client = server.client(agent_id)
    messages = [{"role": "user", "content": "Name three rivers of Europe."}]
    first = client.chat.completions.create(model="fragile", messages=messages, max_tokens=12,
                                           **GREEDY)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And three of Asia?"}]
    return client, messages, first.usage.prompt_tokens + first.usage.completion_tokens


@pytest.mark.parametrize("target", ["broken-weights", "nan-weights"])
def test_failed_load_rolls_back_and_keeps_caches(fragile_server, target):
    client, messages, history = _agent_turns(fragile_server, f"survivor-{target}")
    response = swap(fragile_server, target)
    assert response.status_code == 500
    body = response.json()
    assert body["status"] == "rolled_back", body
    assert any(s["name"] == "load" and not s["ok"] for s in body["steps"])
    print(body["message"])
    health = fragile_server.health()
    assert health["state"] == "ready" and health["model"] == "fragile"
    again = client.chat.completions.create(model="fragile", messages=messages, max_tokens=8,
                                           **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens >= history - 4


def test_failed_rollback_degrades_until_a_good_swap(fragile_server):
    # The loaded model's files go bad on disk: the model in memory still serves, but a
    # failed swap cannot roll back to it.
    (fragile_server.fragile / "model.safetensors").write_bytes(b"\x00" * 4096)
    body = swap(fragile_server, "broken-weights", mode="sequential").json()
    assert body["status"] == "degraded", body
    health = httpx.get(f"{fragile_server.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["state"] == "degraded"
    chat = httpx.post(f"{fragile_server.url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "degraded"
    assert "rollback" in chat.json()["error"]["message"]

    recovered = swap(fragile_server, SMOLLM2)
    assert recovered.json()["status"] == "success", recovered.text
    assert fragile_server.health()["state"] == "ready"
    reply = fragile_server.client().chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **GREEDY)
    assert reply.model == SMOLLM2
    assert httpx.get(f"{fragile_server.url}/admin/models/current",
                     headers=ADMIN).json()["state"] == "ready"


def test_full_disk_during_eviction_rolls_back_and_loses_nothing(tmp_path):
    # The server process may not grow any file past 4 MB (see ServerProcess): a SmolLM2
    # cache of a few dozen tokens fits (46 KB per token, no whole chunk), one of 500 tokens
    # does not (its 128-token chunks take 5.9 MB each).
    server = ServerProcess(SMOLLM2, max_file_bytes=4 * 2**20, admin_key=KEY,
                           cache_dir=str(tmp_path)).start()
    try:
        def turn(agent, messages):
            reply = server.client(agent).chat.completions.create(
                model=SMOLLM2, messages=messages, max_tokens=6, **GREEDY)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            return reply.usage

        talks = {agent: [{"role": "user", "content": f"Hello, I am {agent}."}]
                 for agent in ("small", "big")}
        for agent, messages in talks.items():
            turn(agent, messages)
        assert swap(server, SMOLLM2).json()["status"] == "success"
        big_file = next(tmp_path.glob(f"*/{agent_file_name('big')}"))
        written_before = read_summary(big_file)

        talks["big"].append({"role": "user", "content": HISTORY[:len(HISTORY) // 3]})
        grown = turn("big", talks["big"])
        talks["small"].append({"role": "user", "content": "Still there?"})
        turn("small", talks["small"])
        response = swap(server, SMOLLM2, mode="sequential")
        body = response.json()
        assert response.status_code == 507, body
        assert body["status"] == "aborted" and body["failed_step"] == "evict"
        assert "could not be written" in body["message"], body["message"]
        assert [s["name"] for s in body["steps"]] == ["drain", "evict"]
        assert server.health()["state"] == "ready"
        assert value(scrape(server), "semantic_cache_write_failures_total") >= 1

        # Nothing lost: the big agent's whole history is still hot.
        talks["big"].append({"role": "user", "content": "Summarise that in one line."})
        history = grown.prompt_tokens + grown.completion_tokens
        assert turn("big", talks["big"]).prompt_tokens_details.cached_tokens >= history - 4

        # Nothing corrupted: every cache file reads whole, the big agent's older file is
        # the one written before, and no temporary file is left behind.
        files = list(tmp_path.glob("*/*.safetensors"))
        assert {f.name for f in files} == {agent_file_name("small"), agent_file_name("big")}
        for path in files:
            arrays = load_file(str(path))
            assert arrays["tokens"].shape == (read_summary(path)["tokens"],)
        assert read_summary(big_file) == written_before
        assert not list(tmp_path.rglob("*.tmp.*"))
        assert not list(tmp_path.rglob("chunks/*"))  # none was written, none is left
    finally:
        server.stop()
