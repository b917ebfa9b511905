"""The HTTP layer in process (Starlette's TestClient, the real app over fake models): the
shapes of replies, streams, errors and admin answers, and that every endpoint that reports
state reads the same snapshot."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FAST_ADMIN_KEY
from tests.polling import wait_for

ADMIN = {"X-Admin-Key": FAST_ADMIN_KEY}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
KEY_A, KEY_B = "key-a-0001", "key-b-0002"  # API keys are at least 8 characters


@pytest.fixture
def client(make_client):
    return make_client()


def _metrics(client) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text)
            for s in family.samples}


def test_chat_reply_and_cached_tokens(client):
    first = client.post("/v1/chat/completions", json=CHAT, headers={"X-Agent-ID": "a1"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model"] == "fake-a" and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from A."}
    again = client.post("/v1/chat/completions", headers={"X-Agent-ID": "a1"}, json={
        **CHAT, "messages": [*CHAT["messages"], body["choices"][0]["message"],
                             {"role": "user", "content": "And?"}]}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == \
        body["usage"]["prompt_tokens"] + len("Hello from A.")


def test_stream_chunks_then_usage_then_done(client):
    with client.stream("POST", "/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["model"] for c in chunks} == {"fake-a"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello from A."
    assert chunks[-1]["usage"]["completion_tokens"] == len("Hello from A.")


def test_messages_api_reply(client):
    reply = client.post("/v1/messages", json={"max_tokens": 32, **CHAT}).json()
    assert reply["content"] == [{"type": "text", "text": "Hello from A."}]
    assert reply["stop_reason"] == "end_turn" and reply["model"] == "fake-a"
    missing = client.post("/v1/messages", json={**CHAT, "max_tokens": 8, "model": "nope"})
    assert missing.status_code == 404 and missing.json()["type"] == "error"


@pytest.mark.parametrize(("model", "status", "code"), [
    ("nope", 404, "model_not_found"), ("fake-b", 409, "model_not_loaded")])
def test_a_model_that_is_not_serving(client, model, status, code):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": model})
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_health_status_and_metrics_read_one_snapshot(client):
    client.post("/v1/chat/completions", json=CHAT, headers={"X-Agent-ID": "snap"})
    health = client.get("/health").json()
    assert health == {"state": "ready", "model": "fake-a", "resident": ["fake-a"], "pinned": [],
                      "in_flight": 0, "held": 0, "active_sequences": 0,
                      "blas": health["blas"]}
    current = client.get("/admin/models/current", headers=ADMIN).json()
    assert current["model_id"] == "fake-a" and current["state"] == "ready"
    assert current["caches"]["hot_agents"] == 1 and current["caches"]["lookups"]["miss"] == 1
    assert current["caches"]["disk_budget_bytes"] == 2**30
    samples = _metrics(client)
    assert samples[("semantic_agents", (("residency", "hot"),))] == 1
    assert samples[("semantic_cache_lookups_total", (("outcome", "miss"),))] == 1
    assert samples[("semantic_kv_bytes", (("state", "used"),))] == \
        current["kv_pool"]["used_bytes"]
    assert samples[("semantic_cache_writing_bytes", ())] == current["caches"]["writing_bytes"]
    assert samples[("semantic_cache_write_behind_waits_total", ())] == \
        current["caches"]["write_behind_waits"] == 0


def test_swap_outcomes_map_to_statuses_and_are_all_recorded(client, fake_models):
    assert client.post("/admin/models/swap", json={"model_id": "fake-b"},
                       headers=ADMIN).status_code == 200
    fake_models["fake-b"].step_gate = threading.Event()  # a request stays in flight
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/v1/chat/completions", json=CHAT)
        wait_for(lambda: client.get("/health").json()["active_sequences"], timeout=5)
        aborted = client.post("/admin/models/swap", headers=ADMIN,
                              json={"model_id": "fake-a", "timeout_seconds": 0.05,
                                    "mode": "sequential"})
        fake_models["fake-b"].step_gate.set()
        assert running.result().json()["model"] == "fake-b"
    assert aborted.status_code == 504
    assert aborted.json()["status"] == "aborted" and aborted.json()["failed_step"] == "drain"
    fake_models["fake-a"].load = "fail"
    rolled = client.post("/admin/models/swap", json={"model_id": "fake-a", "mode": "sequential"},
                         headers=ADMIN)
    assert rolled.status_code == 500 and rolled.json()["status"] == "rolled_back"
    assert [s["name"] for s in rolled.json()["rollback_steps"]] == [
        "load", "reconfigure", "retag", "reinit"]
    history = client.get("/admin/swaps", headers=ADMIN).json()["data"]
    assert [h["status"] for h in history] == ["success", "aborted", "rolled_back"]
    samples = _metrics(client)
    assert {(outcome, mode): samples[("semantic_swaps_total", (("mode", mode),
                                                               ("result", outcome)))]
            for outcome, mode in (("success", "dual"), ("aborted", "sequential"),
                                  ("rolled_back", "sequential"))} == {
        ("success", "dual"): 1, ("aborted", "sequential"): 1, ("rolled_back", "sequential"): 1}


def test_admin_needs_its_key(client):
    assert client.get("/admin/models/current").status_code == 401
    assert client.get("/admin/swaps", headers={"X-Admin-Key": "wrong"}).status_code == 401


def test_a_page_on_another_host_or_a_form_post_is_refused(client):
    rebound = client.post("/v1/chat/completions", json=CHAT,
                          headers={"Host": "attacker.example:8000"})
    assert rebound.status_code == 403
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.post("/v1/chat/completions", json=CHAT,
                           headers={"Host": host}).status_code == 200, host
    form = client.post("/v1/chat/completions", content=b"messages=hi",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    plain = client.post("/v1/messages", content=json.dumps({**CHAT, "max_tokens": 4}),
                        headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["type"] == "error"


def test_api_keys_namespace_agents_and_prefixes(make_client):
    client = make_client(api_keys=[KEY_A, KEY_B])
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 401
    wrong = client.post("/v1/messages", json={**CHAT, "max_tokens": 4},
                        headers={"x-api-key": "nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/health").status_code == 200  # operations stay open

    def turn(key, agent, messages):
        headers = {"Authorization": f"Bearer {key}"} | ({"X-Agent-ID": agent} if agent else {})
        reply = client.post("/v1/chat/completions", json={**CHAT, "messages": messages},
                            headers=headers)
        assert reply.status_code == 200, reply.text
        return reply.json()

    history = [{"role": "user", "content": "My secret is 42."}]
    first = turn(KEY_A, "shared-name", history)
    history += [first["choices"][0]["message"], {"role": "user", "content": "Secret?"}]
    assert turn(KEY_A, "shared-name", history)["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0
    # the same agent id under another key is another agent: nothing of A's is reused
    assert turn(KEY_B, "shared-name", history)["usage"]["prompt_tokens_details"][
        "cached_tokens"] == 0
    # a new agent of A starts from the prefix A's agent holds; B's agents never do
    assert turn(KEY_A, "newcomer", history)["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0
    assert turn(KEY_B, "newcomer", history)["usage"]["prompt_tokens_details"][
        "cached_tokens"] > 0  # from B's own shared-name, which sent this history above
    only_a = [{"role": "user", "content": "A's own notes: the vault code is 7. " * 4}]
    turn(KEY_A, "keeper", only_a)
    turn(KEY_A, None, only_a)  # anonymous prefixes are per tenant too
    assert turn(KEY_B, None, only_a)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert turn(KEY_B, "spy", only_a)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert turn(KEY_A, None, only_a)["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {**CHAT, "stop": "x" * 257}, "stop"),
    ("/v1/chat/completions", {**CHAT, "stop": ["ok", "y" * 300]}, "stop"),
    ("/v1/messages", {**CHAT, "max_tokens": 4, "stop_sequences": ["z" * 257]},
     "stop_sequences"),
])
def test_long_stop_strings_are_refused(client, path, body, param):
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    if path == "/v1/chat/completions":
        assert response.json()["error"]["param"] == param
    assert "256" in response.text


def test_a_request_held_past_the_limit_gets_503_with_retry_after(make_client, fake_models):
    client = make_client(swap_hold_seconds=0.2)
    fake_models["fake-b"].load_gate = threading.Event()  # the swap's load hangs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        swapping = pool.submit(client.post, "/admin/models/swap", headers=ADMIN,
                               json={"model_id": "fake-b", "mode": "sequential"})
        wait_for(lambda: client.get("/health").json()["state"] == "swapping", timeout=5)
        held = client.post("/v1/chat/completions", json=CHAT)
        fake_models["fake-b"].load_gate.set()
        assert swapping.result().json()["status"] == "success"
    assert held.status_code == 503 and held.headers["Retry-After"] == "1"
    assert held.json()["error"]["code"] == "swap_in_progress"


def test_agent_ids_never_leave_the_cache_folder(client, tmp_path):
    for agent in ("..", "...", "..:..", "@..@", "-..-"):
        reply = client.post("/v1/chat/completions", json=CHAT, headers={"X-Agent-ID": agent})
        assert reply.status_code == 200, agent
    for agent in ("../escape", "a/b", "..\\x", "/etc/passwd", "a" * 129, ""):
        refused = client.post("/v1/chat/completions", json=CHAT, headers={"X-Agent-ID": agent})
        assert refused.status_code == 400, agent
    assert client.post("/admin/models/swap", json={"model_id": "fake-b"},
                       headers=ADMIN).status_code == 200  # every hot cache to disk
    caches = tmp_path / "caches"
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "models" not in p.parts]
    assert len(files) >= 5
    assert all(p.is_relative_to(caches) for p in files)
    assert all(p.name == "tag.json" or len(p.stem) == 32 for p in files)


def test_a_session_named_in_the_url_keeps_an_agent_cache(client):
    """/session/<id>/v1/... is /v1/... with that session (for clients such as Qwen Code
    that send no identity); an id outside the alphabet is no route."""
    url = "/session/qwen-1/v1/chat/completions"
    first = client.post(url, json=CHAT).json()
    again = client.post(url, json={**CHAT, "messages": [
        *CHAT["messages"], first["choices"][0]["message"], {"role": "user", "content": "And?"}]})
    assert again.status_code == 200
    cached = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"]
    assert client.post("/session/bad id/v1/chat/completions", json=CHAT).status_code == 404
