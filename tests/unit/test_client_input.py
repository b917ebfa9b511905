"""What a client sends that the server must refuse cleanly (issue 34): requests without an
API key when a blank key is configured, names that would reach the filesystem unchecked,
text no tokenizer can take, and a client that leaves while it sends its body. Each is a
4xx (or, for the client that left, a log line) and never a 500 with a traceback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from semantic_server.api.guard import GuardMiddleware, tenant_of
from semantic_server.app import create_app
from semantic_server.cli import CliError, _settings, main
from semantic_server.config import API_KEY_MIN_LENGTH, Settings
from semantic_server.engine.service import tokenize
from semantic_server.errors import AdapterNotFound, InvalidRequest, ModelNotFound
from semantic_server.models import tokenizer as fast
from semantic_server.models.adapters import AdapterCatalog
from semantic_server.models.catalog import ModelCatalog
from tests.fakes import (
    FAST_ADMIN_KEY,
    FakeGenerator,
    FakeRegistry,
    fake_settings,
    write_model_dirs,
)
from tests.unit.test_adapters import write_adapter
from tests.unit.test_tokenizer import write_imported

ADMIN = {"X-Admin-Key": FAST_ADMIN_KEY}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
GOOD_KEY = "key-x-0123456789"
LONG_NAMES = ["a" * 300, "é" * 4000]  # over NAME_MAX (255 bytes), and over PATH_MAX too


# 1. API keys


@pytest.mark.parametrize("keys", [["", GOOD_KEY], ["        ", GOOD_KEY], [GOOD_KEY, "short"],
                                  [f" {GOOD_KEY}"], [f"{GOOD_KEY}\n"]])
def test_blank_short_or_padded_api_keys_stop_the_server_at_startup(keys, monkeypatch):
    with pytest.raises(ValidationError) as refused:
        Settings(api_keys=keys)
    assert [error["loc"] for error in refused.value.errors()] == [("api_keys",)]
    message = str(refused.value)
    assert f"at least {API_KEY_MIN_LENGTH} characters" in message
    for key in keys:  # never the keys themselves, not even the good one
        assert not key.strip() or key.strip() not in message
    # what `semantic-server serve` prints: one line naming the variable
    monkeypatch.setenv("SEMANTIC_API_KEYS", json.dumps(keys))
    with pytest.raises(CliError) as printed:
        _settings()
    assert str(printed.value).startswith("invalid setting: SEMANTIC_API_KEYS: ")
    assert all(not key.strip() or key.strip() not in str(printed.value) for key in keys)


def test_valid_api_keys_and_an_empty_admin_key_are_accepted():
    assert [k.get_secret_value() for k in Settings(api_keys=[GOOD_KEY]).api_keys] == [GOOD_KEY]
    assert Settings(api_keys=[]).api_keys == []
    assert Settings(admin_key="").admin_key.get_secret_value() == ""  # the admin API off


def test_the_min_length_is_documented_where_the_operator_reads():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `SEMANTIC_API_KEYS`"))
    assert f"at least {API_KEY_MIN_LENGTH} characters" in row
    assert f"at least {API_KEY_MIN_LENGTH} characters" in \
        Settings.model_fields["api_keys"].description


async def _guarded(api_keys: list[str], headers: dict[str, str]) -> tuple[int, object]:
    """The status a guard of ``api_keys`` answers for a /v1 POST with ``headers``, and the
    tenant the route saw (None when the request never reached it)."""
    seen: list = []
    sent: list = []

    async def app(scope, receive, send):
        seen.append(scope["state"]["tenant"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    guard = GuardMiddleware(app, api_keys=api_keys, bound_host="127.0.0.1")
    await guard({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"host", b"127.0.0.1:8000"),
                             (b"content-type", b"application/json"),
                             *((k.lower().encode(), v.encode()) for k, v in headers.items())]},
                receive, send)
    return sent[0]["status"], (seen[0] if seen else None)


@pytest.mark.anyio
async def test_a_missing_key_never_matches_even_a_blank_one():
    """Settings refuses a blank key; the guard must not let a missing key match one that
    got past it anyway (it compared the missing key as "")."""
    keys = ["", GOOD_KEY]
    assert await _guarded(keys, {}) == (401, None)
    assert await _guarded(keys, {"Authorization": "Bearer "}) == (401, None)
    assert await _guarded(keys, {"x-api-key": ""}) == (401, None)
    assert await _guarded(keys, {"x-api-key": "nope-nope-nope"}) == (401, None)
    assert await _guarded(keys, {"x-api-key": GOOD_KEY}) == (200, tenant_of(GOOD_KEY))
    assert await _guarded([""], {}) == (401, None)  # closed, not open


def test_an_empty_admin_key_turns_the_admin_api_off(tmp_path, fake_models):
    write_model_dirs(tmp_path / "models", list(fake_models))
    registry = FakeRegistry(ModelCatalog(tmp_path / "models"), fake_models)
    app = create_app(fake_settings(tmp_path, admin_key=""), registry=registry,
                     make_generator=FakeGenerator.factory)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for headers in ({}, {"X-Admin-Key": ""}):
            off = client.get("/admin/models/current", headers=headers)
            assert off.status_code == 403 and off.json()["error"]["code"] == "admin_disabled"


# 2. Client names that would reach the filesystem


@pytest.mark.parametrize("name", [*LONG_NAMES, "a" * 129, "..", ".hidden", "a/b", "a\\b",
                                  "a\x00b", "caps ", "", "caps\n"])
def test_the_adapter_catalog_checks_a_name_before_any_path(tmp_path, name):
    write_adapter(tmp_path / "adapters", "caps")
    catalog = AdapterCatalog(tmp_path / "adapters")
    with pytest.raises(AdapterNotFound) as refused:
        catalog.resolve(name)
    assert len(str(refused.value)) < 300  # a long name is not echoed back whole
    assert catalog.resolve("caps").name == "caps"


def test_the_longest_adapter_name_a_client_may_give_resolves(tmp_path):
    write_adapter(tmp_path / "adapters", "c.-_9" * 25 + "abc")  # 128 characters
    assert AdapterCatalog(tmp_path / "adapters").resolve("c.-_9" * 25 + "abc").rank > 0


def test_a_filesystem_error_on_an_adapter_name_is_not_found(tmp_path, monkeypatch):
    write_adapter(tmp_path / "adapters", "caps")
    catalog = AdapterCatalog(tmp_path / "adapters")

    def unreachable(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_dir", unreachable)
    with pytest.raises(AdapterNotFound):
        catalog.resolve("caps")


def test_a_folder_whose_name_no_client_can_give_is_listed_as_unusable(tmp_path):
    write_adapter(tmp_path / "adapters", "caps")
    write_adapter(tmp_path / "adapters", "with space")
    listing = {entry.name: entry for entry in AdapterCatalog(tmp_path / "adapters").available()}
    assert listing["caps"].adapter is not None
    assert listing["with space"].adapter is None and "name" in listing["with space"].error


@pytest.mark.parametrize("name", [*LONG_NAMES, "..", "../models/fake-a", ".fake-a", "fake-a/",
                                  "/etc", ""])
def test_the_model_catalog_checks_a_model_id_before_any_path(tmp_path, fake_models, name):
    write_model_dirs(tmp_path / "models", list(fake_models))
    catalog = ModelCatalog(tmp_path / "models")
    with pytest.raises(ModelNotFound) as refused:
        catalog.resolve(name)
    assert len(str(refused.value)) < 300
    assert catalog.resolve("fake-a") == tmp_path / "models" / "fake-a"


def test_model_folders_no_client_can_name_are_not_listed(tmp_path, fake_models):
    write_model_dirs(tmp_path / "models", [*fake_models, "with space"])
    assert {e.model_id for e in ModelCatalog(tmp_path / "models").available()} == set(fake_models)


def test_the_importer_refuses_a_model_id_no_client_could_give(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(SystemExit, match="a model id is"):
        main(["models", "import", str(tmp_path / "x.gguf"), "--name", "with space"])
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("name", LONG_NAMES)
def test_long_names_over_http_are_404_in_each_apis_shape(make_client, tmp_path, name):
    write_adapter(tmp_path / "adapters", "caps", config={"semantic_base": {"model_id": "fake-a"}})
    client = make_client()
    for path, body in (("/v1/chat/completions", CHAT),
                       ("/v1/completions", {"prompt": "Hi", "max_tokens": 4}),
                       ("/v1/messages", CHAT)):
        for model, code in ((f"fake-a:{name}", "adapter_not_found"),
                            (name, "model_not_found")):
            reply = client.post(path, json={**body, "model": model})
            assert reply.status_code == 404, (path, reply.text[:300])
            error = reply.json()["error"]
            if path == "/v1/messages":
                assert reply.json()["type"] == "error" and error["type"] == "not_found_error"
            else:
                assert error["code"] == code
    shown = client.get(f"/admin/adapters/{name}", headers=ADMIN)
    assert shown.status_code == 404 and shown.json()["error"]["code"] == "adapter_not_found"
    swapped = client.post("/admin/adapters/swap", headers=ADMIN,
                          json={"model_id": "fake-a", "adapter": name})
    assert swapped.status_code == 404 and swapped.json()["error"]["code"] == "adapter_not_found"
    model_swap = client.post("/admin/models/swap", headers=ADMIN, json={"model_id": name})
    assert model_swap.status_code == 404, model_swap.text[:300]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


# 3. Text that cannot be tokenized


@pytest.mark.parametrize("shape", ["byte-level", "spm"])
def test_a_real_tokenizer_refusing_text_is_a_400_naming_the_field(tmp_path, shape):
    """SmolLM2's and Gemma's tokenizers (tiny, in their shapes) raise TypeError on a lone
    surrogate: for a completion's prompt that was a 500."""
    tokenizer = fast.load_tokenizer(write_imported(tmp_path / shape, shape))
    size = len(tokenizer.vocab)
    for prompt, param in (("\ud800 hi", "prompt"),
                          ([{"role": "user", "content": "hi \udfff"}], "messages")):
        with pytest.raises(InvalidRequest) as refused:
            tokenize(tokenizer, prompt, size)
        assert refused.value.param == param and "surrogate" in str(refused.value)
    with pytest.raises(InvalidRequest) as refused:
        tokenize(tokenizer, [{"role": "user", "content": "hi"}], size,
                 {"tools": [{"name": "f", "description": "\ud83d"}]})
    assert refused.value.param == "tools"
    assert tokenize(tokenizer, "hi 😀", size) == list(tokenizer.encode("hi 😀"))


def test_any_text_the_tokenizer_refuses_is_a_400_naming_the_field():
    class Refusing:
        def encode(self, text):
            raise ValueError("no")

        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise TypeError("no")

    for prompt, param in (("hi", "prompt"), ([{"role": "user", "content": "hi"}], "messages")):
        with pytest.raises(InvalidRequest) as refused:
            tokenize(Refusing(), prompt, 100)
        assert refused.value.param == param


@pytest.fixture
def client_input(make_client):
    return make_client()


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "\ud800 hi", "max_tokens": 4}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\ud800 hi"}]},
     "messages"),
    ("/v1/messages", {**CHAT, "messages": [{"role": "user", "content": "\ud800 hi"}]},
     "messages"),
    ("/v1/messages", {**CHAT, "system": "\udc00"}, "messages"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field_on_every_api(client_input, path, body,
                                                                  param):
    reply = client_input.post(path, content=json.dumps(body),  # the \ud800 escape, as sent
                              headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    if path == "/v1/messages":
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert "surrogate" in reply.json()["error"]["message"]
    else:
        assert reply.json()["error"]["param"] == param


# 4. A client that leaves while sending its body


@pytest.mark.anyio
async def test_a_client_that_leaves_mid_body_is_one_log_line_without_a_traceback(
        start, caplog):
    server = await start()
    app = create_app(server.settings, registry=server.registry,
                     make_generator=FakeGenerator.factory)
    app.state.server = server  # the lifespan's work, done by the fixture
    parts = [{"type": "http.request", "body": b'{"messages": [{"role": "us',
              "more_body": True}]
    sent: list = []

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    caplog.set_level(logging.DEBUG)
    await app({"type": "http", "method": "POST", "path": "/v1/chat/completions",
               "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
               "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 8000),
               "client": ("127.0.0.1", 40000),
               "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                           (b"content-length", b"4000")]}, receive, send)
    assert sent == []  # nobody is there to read an answer
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    left = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(left) == 1 and left[0].levelno in (logging.INFO, logging.WARNING)
