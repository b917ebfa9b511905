"""Property-based fuzzing of the chat, messages and admin endpoints in process (the real
app over fake models): a few hundred derandomized requests per endpoint, each answered
with a well-formed status below 500, the server still ready afterwards."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from semantic_server.app import create_app
from semantic_server.models.catalog import ModelCatalog
from tests.fakes import FakeGenerator, FakeModel, FakeRegistry, fake_settings, write_model_dirs
from tests.fuzzing import (
    ADMIN_PATHS,
    admin_bodies,
    chat_bodies,
    check,
    header_text,
    messages_bodies,
)

KEY = "fuzz-key"
FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    models = {"fake-a": FakeModel(reply="Hi."), "fake-b": FakeModel(reply="B.")}
    write_model_dirs(root / "models", list(models))
    app = create_app(fake_settings(root, admin_key=KEY, max_tokens_limit=4),
                     registry=FakeRegistry(ModelCatalog(root / "models"), models),
                     make_generator=FakeGenerator.factory)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        yield client


def _post(client: TestClient, path: str, body: object, headers: dict[str, str]) -> None:
    with client.stream("POST", path, content=json.dumps(body).encode(),
                       headers={"content-type": "application/json", **headers}) as response:
        response.read()  # a stream must end cleanly too
    check(response.status_code, path, response.json() if response.status_code >= 400
          else None)


@FUZZ
@given(body=chat_bodies("fake-a"), agent=st.one_of(st.none(), header_text))
def test_chat_completions_never_500(client, body, agent):
    _post(client, "/v1/chat/completions", body, {"X-Agent-ID": agent} if agent else {})


@FUZZ
@given(body=messages_bodies("fake-a"))
def test_messages_never_500(client, body):
    _post(client, "/v1/messages", body, {})


@FUZZ
@given(path=st.sampled_from(ADMIN_PATHS), key=st.one_of(st.none(), st.just(KEY), header_text),
       body=admin_bodies("fake-a"))
def test_admin_never_500(client, path, key, body):
    headers = {"X-Admin-Key": key} if key is not None else {}
    if path.endswith("swap"):
        _post(client, path, body, headers)
    else:
        response = client.get(path, headers=headers)
        check(response.status_code, path, response.json())
    assert client.get("/health").json()["state"] == "ready"
