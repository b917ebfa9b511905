"""Property-based fuzzing against a real server and model: whatever the body, headers or
key, the server answers with a well-formed status below 500 and keeps serving.

The fast tier (tests/unit/test_fuzz_fast.py) runs many examples in process; here a few per
endpoint go through a real server process, its real tokenizer and chat template, derandomized
so CI runs the same ones every time (max_tokens is capped at 4 to keep them short).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SMOLLM2
from tests.fuzzing import (
    ADMIN_PATHS,
    admin_bodies,
    chat_bodies,
    check,
    header_text,
    messages_bodies,
)
from tests.servers import ServerProcess

KEY = "fuzz-key"
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_server(models_dir, tmp_path_factory):
    server = ServerProcess(SMOLLM2, admin_key=KEY, max_tokens_limit="4",
                           cache_dir=str(tmp_path_factory.mktemp("fuzz-caches"))).start()
    yield server
    server.stop()


def _post(server: ServerProcess, path: str, body: object, headers: dict[str, str]) -> None:
    content = json.dumps(body).encode()
    with httpx.stream("POST", f"{server.url}{path}", content=content, timeout=120,
                      headers={"content-type": "application/json", **headers}) as response:
        response.read()  # a stream must end cleanly too
    check(response.status_code, path, response.json() if response.status_code >= 400
          else None)


@FUZZ
@given(body=chat_bodies(SMOLLM2), agent=st.one_of(st.none(), header_text))
def test_chat_completions_never_500(fuzz_server, body, agent):
    _post(fuzz_server, "/v1/chat/completions", body, {"X-Agent-ID": agent} if agent else {})


@FUZZ
@given(body=messages_bodies(SMOLLM2))
def test_messages_never_500(fuzz_server, body):
    _post(fuzz_server, "/v1/messages", body, {})


@FUZZ
@given(path=st.sampled_from(ADMIN_PATHS), key=st.one_of(st.none(), st.just(KEY), header_text),
       body=admin_bodies(SMOLLM2))
def test_admin_never_500(fuzz_server, path, key, body):
    headers = {"X-Admin-Key": key} if key is not None else {}
    if path.endswith("swap"):
        _post(fuzz_server, path, body, headers)
    else:
        response = httpx.get(f"{fuzz_server.url}{path}", headers=headers, timeout=60)
        check(response.status_code, path, response.json())
    assert fuzz_server.health()["state"] == "ready"
