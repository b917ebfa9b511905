"""Property-based fuzzing of the chat, messages and admin endpoints: whatever the body,
headers or key, the server answers with a well-formed status below 500 and keeps serving.

Hypothesis generates a few hundred requests per endpoint, derandomized so CI runs the same
ones every time; bodies mix valid structure with arbitrary JSON so most requests reach
deep into validation and some run for real (max_tokens is capped at 4 to keep them short).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from experiments.servers import ServerProcess
from tests.conftest import SMOLLM2

KEY = "fuzz-key"
FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
header_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                      max_size=140)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), json_values)
contents = st.one_of(st.text(max_size=200), st.lists(st.fixed_dictionaries(
    {"type": st.one_of(st.just("text"), json_values), "text": st.one_of(st.text(max_size=50),
                                                                       json_values)})),
    json_values)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), min_size=0,
             max_size=4),
    json_values)
maybe = {  # optional fields: plausible values or anything
    "model": st.one_of(st.just(SMOLLM2), st.text(max_size=20), json_values),
    "max_tokens": st.one_of(st.integers(-5, 10), json_values),
    "temperature": st.one_of(st.floats(-1, 3), json_values),
    "top_p": st.one_of(st.floats(-1, 2), json_values),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6),
                      json_values),
    "seed": st.one_of(st.integers(-2**64, 2**64), json_values),
    "n": st.one_of(st.integers(-1, 3), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "user": st.one_of(header_text, json_values),
}


@pytest.fixture(scope="module")
def fuzz_server(models_dir, tmp_path_factory):
    server = ServerProcess(SMOLLM2, admin_key=KEY, max_tokens_limit="4",
                           cache_dir=str(tmp_path_factory.mktemp("fuzz-caches"))).start()
    yield server
    server.stop()


def _check(response: httpx.Response) -> None:
    event(f"status {response.status_code}")  # --hypothesis-show-statistics shows the mix
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        body = response.json()
        if response.url.path == "/v1/messages":  # Anthropic's error shape
            assert body["type"] == "error" and body["error"]["type"].endswith("error")
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]


def _post(server: ServerProcess, path: str, body: object, headers: dict[str, str]) -> None:
    content = json.dumps(body).encode()
    with httpx.stream("POST", f"{server.url}{path}", content=content, timeout=120,
                      headers={"content-type": "application/json", **headers}) as response:
        response.read()  # a stream must end cleanly too
    _check(response)


@FUZZ
@given(body=st.fixed_dictionaries({"messages": messages}, optional=maybe),
       agent=st.one_of(st.none(), header_text))
def test_chat_completions_never_500(fuzz_server, body, agent):
    _post(fuzz_server, "/v1/chat/completions", body, {"X-Agent-ID": agent} if agent else {})


@FUZZ
@given(body=st.fixed_dictionaries(
    {"messages": messages, "max_tokens": st.one_of(st.integers(-2, 6), json_values)},
    optional={"system": st.one_of(st.text(max_size=50), json_values),
              "stop_sequences": st.one_of(st.lists(st.text(max_size=5), max_size=6),
                                          json_values),
              "metadata": st.one_of(st.fixed_dictionaries({"user_id": header_text}),
                                    json_values),
              **{k: maybe[k] for k in ("model", "temperature", "top_p", "stream")}}))
def test_messages_never_500(fuzz_server, body):
    _post(fuzz_server, "/v1/messages", body, {})


@FUZZ
@given(path=st.sampled_from(["/admin/models/swap", "/admin/models/current",
                             "/admin/models/available", "/admin/swaps", "/admin/agents"]),
       key=st.one_of(st.none(), st.just(KEY), header_text),
       body=st.one_of(json_values, st.fixed_dictionaries(
           {"model_id": st.text(max_size=30).filter(lambda m: m != SMOLLM2)},
           optional={"timeout_seconds": st.one_of(st.floats(-5, 5), json_values)})))
def test_admin_never_500(fuzz_server, path, key, body):
    headers = {"X-Admin-Key": key} if key is not None else {}
    if path.endswith("swap"):
        _post(fuzz_server, path, body, headers)
    else:
        _check(httpx.get(f"{fuzz_server.url}{path}", headers=headers, timeout=60))
    assert fuzz_server.health()["state"] == "ready"
