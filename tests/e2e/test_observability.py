"""Prometheus metrics, structured logs and request ids, on a real server process."""

from __future__ import annotations

import json

import httpx

from tests.conftest import SMOLLM2
from tests.e2e.helpers import ADMIN, DUAL_STEPS, GREEDY, KEY, scrape, swap, value
from tests.servers import ServerProcess


def test_metrics_logs_and_request_ids(models_dir, tmp_path):
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path)).start()
    try:
        before = scrape(server)
        assert value(before, "semantic_model_info", model_id=SMOLLM2,
                     tag=json.loads(httpx.get(f"{server.url}/admin/models/current",
                                              headers=ADMIN).text)["tag"]) == 1
        client = server.client("observed-agent")
        messages = [{"role": "user", "content": "Name a colour."}]
        first = client.chat.completions.with_raw_response.create(
            model=SMOLLM2, messages=messages, max_tokens=4, extra_headers={
                "X-Request-ID": "my-request-1"}, **GREEDY)
        assert first.headers["x-request-id"] == "my-request-1"
        reply = first.parse()
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "Another one."}]
        client.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=4,
                                       **GREEDY)
        generated = httpx.get(f"{server.url}/health").headers["x-request-id"]
        assert generated.startswith("req-")

        after_turns = scrape(server)
        assert value(after_turns, "semantic_cache_lookups_total", outcome="hot") == \
            value(before, "semantic_cache_lookups_total", outcome="hot") + 1
        assert value(after_turns, "semantic_cache_lookups_total", outcome="miss") >= 1
        assert value(after_turns, "semantic_tokens_total", kind="cached") > 0
        assert value(after_turns, "semantic_tokens_total", kind="generated") >= 2
        assert value(after_turns, "semantic_request_ttft_seconds_count", model=SMOLLM2) == 2
        assert value(after_turns, "semantic_agents", residency="hot") == 1
        assert value(after_turns, "semantic_kv_bytes", state="used") > 0
        assert value(after_turns, "semantic_requests_pinned", model=SMOLLM2,
                     state="serving") == 0
        assert value(after_turns, "semantic_memory_bytes", kind="mlx_active") > 1e8

        assert swap(server, SMOLLM2).json()["status"] == "success"
        after_swap = scrape(server)
        assert value(after_swap, "semantic_swaps_total", result="success", mode="dual") == 1
        assert value(after_swap, "semantic_swap_promotion_pause_seconds_count") == 1
        assert value(after_swap, "semantic_swap_step_seconds_count", step="load") == 1
        assert value(after_swap, "semantic_agents", residency="cold") == 1
        assert value(after_swap, "semantic_agents", residency="hot") == 0

        server.stop()
        server.start()
        messages += [{"role": "assistant", "content": "Blue."},
                     {"role": "user", "content": "And a third?"}]
        server.client("observed-agent").chat.completions.create(
            model=SMOLLM2, messages=messages, max_tokens=4, **GREEDY)
        assert value(scrape(server), "semantic_cache_lookups_total", outcome="disk") == 1
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.output().splitlines()
             if line.startswith("{")]
    requests = [line for line in lines if line["event"] == "request" and line.get("model")]
    assert any(line["request_id"] == "my-request-1" for line in requests)
    assert all(line["agent"] != "observed-agent" and len(line["agent"]) == 12
               for line in requests)
    assert {"prompt_tokens", "cached_tokens", "generated_tokens", "ttft_s", "status"} <= \
        set(requests[0])
    startup = [line["step"] for line in lines if line["event"] == "swap step"
               and line["phase"] == "startup"]
    assert startup[:4] == ["load", "reconfigure", "retag", "reinit"]  # then the restart's
    steps = [line["step"] for line in lines if line["event"] == "swap step"
             and line["phase"] == "swap"]
    assert steps[:9] == DUAL_STEPS
    # one line per lifecycle transition of a model version, in order
    lifecycle = [line["state"] for line in lines if line["event"] == "model version"]
    assert lifecycle[:7] == ["serving", "loading", "warming", "serving", "retiring", "retired",
                             "reclaimed"]


def test_cli_drives_a_running_server(models_dir, tmp_path):
    import http.server
    import os
    import subprocess
    import sys
    import threading

    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(tmp_path)).start()
    env = {**os.environ, "SEMANTIC_ADMIN_KEY": KEY}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "semantic_server", *args, "--url",
                               server.url], env=env, capture_output=True, text=True, timeout=300)

    try:
        server.client("cli-agent").chat.completions.create(
            model=SMOLLM2, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        status = cli("status")
        assert status.returncode == 0 and SMOLLM2 in status.stdout and "ready" in status.stdout
        agents = cli("agents")
        assert "cli-agent" in agents.stdout and "hot" in agents.stdout
        swapped = cli("swap", SMOLLM2)
        assert swapped.returncode == 0 and "success" in swapped.stdout
        assert all(step in swapped.stdout for step in ("dual path", "promote", "retire"))
        assert "cold" in cli("agents").stdout
        unknown = cli("swap", "no-such-model")
        assert unknown.returncode == 1 and "404" in unknown.stderr
        env["SEMANTIC_ADMIN_KEY"] = "wrong"
        denied = cli("status")
        assert denied.returncode == 1 and "401" in denied.stderr
        # Mistakes the user can fix are one line, never a traceback: a URL that is some
        # other HTTP server (this one answers every GET with an HTML 501), a bad setting.
        other = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            not_ours = subprocess.run(
                [sys.executable, "-m", "semantic_server", "status", "--url",
                 f"http://127.0.0.1:{other.server_port}"], env=env, capture_output=True,
                text=True, timeout=300)
        finally:
            other.shutdown()
        assert not_ours.returncode == 1 and "501 without JSON" in not_ours.stderr
        env["SEMANTIC_PORT"] = "eighty"
        bad_setting = cli("status")
        assert bad_setting.returncode == 1 and "SEMANTIC_PORT" in bad_setting.stderr
        assert "Traceback" not in not_ours.stderr + bad_setting.stderr
    finally:
        server.stop()
