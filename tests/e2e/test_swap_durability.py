"""Caches under stress: swaps under load, kill -9 mid-write, reuse policies, odd agent ids."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import threading

import httpx
import numpy as np
from safetensors.numpy import load_file, save_file

from experiments.servers import ServerProcess
from semantic_server.cache.cache_file import read_cache
from tests.conftest import GEMMA, SMOLLM2
from tests.e2e.helpers import GREEDY, HISTORY, KEY, swap
from tests.polling import wait_for


def _all_cache_files_valid(cache_dir) -> int:
    files = [p for p in cache_dir.glob("*/*.safetensors")
             if p.parent.name != "quarantine" and not p.name.startswith(".")]
    for path in files:
        read_cache(path)  # raises on a half-written or otherwise invalid file
    return len(files)


def test_eight_agents_through_five_swaps(models_dir, tmp_path):
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path)).start()
    try:
        stop = threading.Event()
        outcomes: list[tuple[str, int, str]] = []

        def agent(i: int) -> None:
            client = server.client(f"busy-agent-{i}")
            messages = [{"role": "user", "content": f"Agent {i} says hello. Count to three."}]
            while not stop.is_set():
                try:
                    reply = client.chat.completions.create(model=None, messages=messages,
                                                           max_tokens=6, **GREEDY)
                    outcomes.append((f"busy-agent-{i}", 200, reply.model))
                except Exception as exc:  # recorded, then asserted on below
                    outcomes.append((f"busy-agent-{i}", getattr(exc, "status_code", -1),
                                     str(exc)))

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            workers = [pool.submit(agent, i) for i in range(8)]
            results = [swap(server, model) for model in (GEMMA, SMOLLM2, GEMMA, SMOLLM2,
                                                         GEMMA)]
            stop.set()
            for worker in workers:
                worker.result()
        for response in results:
            body = response.json()
            assert body["status"] == "success", body
            assert [s["name"] for s in body["steps"]] == [
                "drain", "evict", "shutdown", "unload", "load", "reconfigure", "retag",
                "reinit"]
            assert all(s["duration_ms"] >= 0 for s in body["steps"])
        failures = [o for o in outcomes if o[1] != 200]
        print(f"{len(outcomes)} requests, {len(failures)} failed;",
              {m: sum(o[2] == m for o in outcomes) for m in (SMOLLM2, GEMMA)})
        assert not failures
        assert {o[2] for o in outcomes} == {SMOLLM2, GEMMA}
    finally:
        server.stop()
    assert _all_cache_files_valid(tmp_path) >= 8


def test_kill_9_mid_write_leaves_valid_files(models_dir, tmp_path):
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path)).start()
    client = server.client("big-agent")
    client.chat.completions.create(model=SMOLLM2, messages=[
        {"role": "user", "content": HISTORY + "Summarise."}], max_tokens=4, **GREEDY)
    for i in range(3):
        server.client(f"small-agent-{i}").chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: httpx.post(f"{server.url}/admin/models/swap", timeout=600,
                                       json={"model_id": GEMMA}, headers={"X-Admin-Key": KEY}))
        # kill in the middle of a cache file's write (a 40 MB file takes tens of ms)
        wait_for(lambda: list(tmp_path.glob("*/.*.tmp.safetensors")), timeout=120,
                 interval=0.001, what="a cache file being written")
        server.stop(signal.SIGKILL)
    partial = list(tmp_path.glob("*/.*.tmp.safetensors"))
    print("killed while writing", [p.name for p in partial])
    _all_cache_files_valid(tmp_path)
    server.start()
    assert not list(tmp_path.glob("*/.*.tmp.safetensors"))
    assert server.health()["state"] == "ready"
    reply = server.client("small-agent-0").chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Hi 0"}], max_tokens=2)
    assert reply.choices[0].message.content is not None
    server.stop()


def test_weights_variant_reuses_caches_only_when_asked(models_dir, tmp_path):
    variant = tmp_path / "models" / "smollm2-variant"
    shutil.copytree(models_dir / SMOLLM2, variant)
    weights = load_file(str(variant / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * np.float32(1.0001)
    save_file(weights, str(variant / "model.safetensors"), metadata={"format": "mlx"})
    caches = tmp_path / "caches"
    messages = [{"role": "user", "content": "List the planets of the solar system."}]

    def turn_on_variant(reuse: str, agent_id: str) -> int:
        server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(caches),
                               cache_reuse=reuse, extra_models=json.dumps([str(variant)]))
        server.start()
        try:
            server.client(agent_id).chat.completions.create(model=SMOLLM2, messages=messages,
                                                             max_tokens=8, **GREEDY)
            assert swap(server, "smollm2-variant").json()["status"] == "success"
            reply = server.client(agent_id).chat.completions.create(
                model="smollm2-variant", messages=messages, max_tokens=8, **GREEDY)
            return reply.usage.prompt_tokens_details.cached_tokens
        finally:
            server.stop()

    assert turn_on_variant("exact", "variant-agent-a") == 0
    assert turn_on_variant("dims", "variant-agent-b") > 0


def test_agent_ids_never_leave_the_cache_folder(models_dir, tmp_path):
    root = tmp_path / "root"
    caches = root / "caches"
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(caches)).start()
    try:
        for agent in ("..", "...", "..:..", "@..@", "-..-"):
            server.client(agent).chat.completions.create(
                model=SMOLLM2, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        for agent in ("../escape", "a/b", "..\\x", "/etc/passwd", "a" * 129, ""):
            response = httpx.post(f"{server.url}/v1/chat/completions", headers={
                "X-Agent-ID": agent}, json={"messages": [{"role": "user", "content": "hi"}]},
                timeout=30)
            assert response.status_code == 400, agent
    finally:
        server.stop()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= 5
    assert all(p.is_relative_to(caches) for p in files)
    assert all(p.name == "tag.json" or len(p.stem) == 32 for p in files)
