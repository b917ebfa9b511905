"""Caches under stress, for real: swaps under load, kill -9 mid-write. (Reuse policies and
odd agent ids are tested in the fast tier.)"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading

import httpx

from semantic_server.cache.cache_file import read_cache
from tests.conftest import SMOLLM2
from tests.e2e.helpers import ADMIN, DUAL_STEPS, GREEDY, HISTORY, KEY, SEQUENTIAL_STEPS, swap
from tests.polling import wait_for
from tests.servers import ServerProcess

PARTIAL = "**/.*.tmp.safetensors"  # a file being written, in a model's folder or its chunks


def _all_cache_files_valid(cache_dir) -> int:
    files = [p for p in cache_dir.glob("*/*.safetensors")
             if p.parent.name != "quarantine" and not p.name.startswith(".")]
    for path in files:
        read_cache(path)  # raises on a half-written or otherwise invalid file
    return len(files)


def test_four_agents_through_a_swap_round_trip(twin, tmp_path):
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path),
                           extra_models=json.dumps([str(twin)])).start()
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

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(agent, i) for i in range(4)]
            # Both paths under load: the twin loads beside SmolLM2 (dual), then SmolLM2
            # comes back in eight steps (sequential).
            results = [swap(server, model, mode=mode)
                       for model, mode in ((twin.name, "dual"), (SMOLLM2, "sequential"))]
            stop.set()
            for worker in workers:
                worker.result()
        for response, steps in zip(results, (DUAL_STEPS, SEQUENTIAL_STEPS), strict=True):
            body = response.json()
            assert body["status"] == "success", body
            assert [s["name"] for s in body["steps"]] == steps
            assert all(s["duration_ms"] >= 0 for s in body["steps"])
        failures = [o for o in outcomes if o[1] != 200]
        print(f"{len(outcomes)} requests, {len(failures)} failed;",
              {m: sum(o[2] == m for o in outcomes) for m in (SMOLLM2, twin.name)})
        assert not failures
        assert {o[2] for o in outcomes} == {SMOLLM2, twin.name}
    finally:
        server.stop()
    assert _all_cache_files_valid(tmp_path) >= 4


def test_kill_9_mid_write_leaves_valid_files(twin, tmp_path):
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path),
                           extra_models=json.dumps([str(twin)])).start()
    client = server.client("big-agent")
    client.chat.completions.create(model=SMOLLM2, messages=[
        {"role": "user", "content": HISTORY[:len(HISTORY) // 3] + "Summarise."}], max_tokens=4,
        **GREEDY)
    for i in range(3):
        server.client(f"small-agent-{i}").chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=2)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: httpx.post(f"{server.url}/admin/models/swap", timeout=600,
                                       json={"model_id": twin.name}, headers=ADMIN))
        # Kill in the middle of a write: an agent's own file or one of the prefix chunks it
        # lists (the big agent's four chunks are 5.9 MB each).
        wait_for(lambda: list(tmp_path.glob(PARTIAL)), timeout=120,
                 interval=0.001, what="a cache file being written")
        server.stop(signal.SIGKILL)
    partial = list(tmp_path.glob(PARTIAL))
    print("killed while writing", [p.name for p in partial])
    _all_cache_files_valid(tmp_path)
    server.start()
    assert not list(tmp_path.glob(PARTIAL))
    assert server.health()["state"] == "ready"
    reply = server.client("small-agent-0").chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Hi 0"}], max_tokens=2)
    assert reply.choices[0].message.content is not None
    server.stop()
