"""LoRA adapters on disk (mlx-lm's format): found, checked and listed before anything uses
them. The adapters are real files: an ``adapter_config.json`` as ``mlx_lm.lora`` writes it
and an ``adapters.safetensors`` of small matrices."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from semantic_server.errors import AdapterInvalid, AdapterNotFound
from semantic_server.models.adapters import AdapterCatalog, AdapterKind, read_adapter
from tests.fakes import FAST_ADMIN_KEY

RANK = 4
MODULES = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj")


def write_adapter(root: Path, name: str, *, rank: int = RANK, config: dict | None = None,
                  weights: dict[str, mx.array] | None = None) -> Path:
    """An adapter folder like ``mlx_lm.lora`` leaves: config and LoRA matrices."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    body = {"model": "models/smollm2-135m-instruct", "fine_tune_type": "lora",
            "num_layers": 2, "lora_parameters": {"rank": rank, "scale": 20.0,
                                                 "dropout": 0.0, "keys": ["self_attn.q_proj",
                                                                          "self_attn.v_proj"]}}
    (folder / "adapter_config.json").write_text(json.dumps({**body, **(config or {})}))
    if weights is None:
        weights = {f"{m}.{leaf}": mx.zeros(shape) for m in MODULES
                   for leaf, shape in (("lora_a", (8, rank)), ("lora_b", (rank, 8)))}
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    return folder


def test_a_valid_adapter_is_read_without_loading_weights(tmp_path):
    adapter = read_adapter(write_adapter(tmp_path, "caps"))
    assert adapter.name == "caps" and adapter.base_model == "smollm2-135m-instruct"
    assert adapter.kind is AdapterKind.LORA and adapter.rank == RANK and adapter.scale == 20.0
    assert adapter.keys == ("self_attn.q_proj", "self_attn.v_proj")
    assert adapter.modules == MODULES and len(adapter.fingerprint) == 16
    recorded = read_adapter(write_adapter(tmp_path, "sig", config={
        "semantic_base": {"model_id": "gemma3-270m"}}))
    assert recorded.base_model == "gemma3-270m"  # what our training script records wins
    assert recorded.fingerprint != adapter.fingerprint  # the config counts


def test_other_weights_give_another_fingerprint(tmp_path):
    one = read_adapter(write_adapter(tmp_path, "one"))
    ones = {f"{m}.{leaf}": mx.ones(shape) for m in MODULES
            for leaf, shape in (("lora_a", (8, RANK)), ("lora_b", (RANK, 8)))}
    two = read_adapter(write_adapter(tmp_path, "two", weights=ones))
    assert one.fingerprint != two.fingerprint


@pytest.mark.parametrize(("config", "weights", "reason"), [
    ({"fine_tune_type": "full"}, None, "full fine-tune"),
    ({"fine_tune_type": "prefix"}, None, "not lora or dora"),
    ({"lora_parameters": {"rank": 0, "scale": 1.0}}, None, "positive integer"),
    ({"lora_parameters": {"rank": RANK}}, None, "scale must be a number"),
    ({"lora_parameters": {"rank": RANK, "scale": 1.0, "keys": "q_proj"}}, None,
     "list of module names"),
    ({"model": None}, None, "base model"),
    ({}, {"model.layers.1.self_attn.q_proj.lora_a": mx.zeros((8, RANK + 1)),
          "model.layers.1.self_attn.q_proj.lora_b": mx.zeros((RANK + 1, 8))},
     "does not match rank"),
    ({}, {"model.layers.1.self_attn.q_proj.lora_a": mx.zeros((8, RANK))}, "lacks lora_a or"),
    ({}, {"model.layers.1.self_attn.q_proj.weight": mx.zeros((8, 8))}, "not a lora weight"),
])
def test_an_unusable_adapter_is_refused_with_its_reason(tmp_path, config, weights, reason):
    with pytest.raises(AdapterInvalid, match=reason):
        read_adapter(write_adapter(tmp_path, "bad", config=config, weights=weights))


def test_missing_or_damaged_files_are_refused(tmp_path):
    folder = write_adapter(tmp_path, "broken")
    (folder / "adapters.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterInvalid, match="not JSON"):
        read_adapter(folder)
    (folder / "adapters.safetensors").unlink()
    with pytest.raises(AdapterInvalid, match="missing"):
        read_adapter(folder)
    (folder / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterInvalid, match="not JSON"):
        read_adapter(folder)


def test_the_catalog_lists_every_folder_and_resolves_by_name(tmp_path):
    catalog = AdapterCatalog(tmp_path / "adapters")
    assert catalog.available() == []  # no folder yet: nothing, not an error
    write_adapter(tmp_path / "adapters", "caps")
    write_adapter(tmp_path / "adapters", "bad", config={"fine_tune_type": "full"})
    listing = {entry.name: entry for entry in catalog.available()}
    assert listing["caps"].adapter is not None and listing["bad"].adapter is None
    assert "full fine-tune" in listing["bad"].error
    assert catalog.resolve("caps").rank == RANK
    for name in ("nope", "../adapters/caps", ".hidden"):
        with pytest.raises(AdapterNotFound):
            catalog.resolve(name)
    with pytest.raises(AdapterInvalid, match="'bad'"):
        catalog.resolve("bad")


def test_the_admin_api_lists_adapters(make_client, tmp_path):
    write_adapter(tmp_path / "adapters", "caps")
    write_adapter(tmp_path / "adapters", "bad", rank=2, config={"lora_parameters": {}})
    client = make_client()
    headers = {"X-Admin-Key": FAST_ADMIN_KEY}
    data = client.get("/admin/adapters", headers=headers).json()["data"]
    assert [(a["name"], a["valid"]) for a in data] == [("bad", False), ("caps", True)]
    assert data[1]["base_model"] == "smollm2-135m-instruct" and data[1]["rank"] == RANK
    assert client.get("/admin/adapters/caps", headers=headers).json()["kind"] == "lora"
    missing = client.get("/admin/adapters/nope", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    bad = client.get("/admin/adapters/bad", headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "adapter_invalid"
    assert client.get("/admin/adapters").status_code == 401


def test_requests_and_swaps_naming_adapters_fail_clearly(make_client, tmp_path):
    """Bad adapter input over HTTP: 404 unknown, 422 unusable or not fitting the model's
    layers (fake models load with none), 409 for a model that is not serving, 400 for a
    malformed body; the model keeps serving, unchanged, through all of it."""
    write_adapter(tmp_path / "adapters", "caps", config={
        "semantic_base": {"model_id": "fake-a"}})
    write_adapter(tmp_path / "adapters", "bad", config={"fine_tune_type": "full"})
    client = make_client()
    headers = {"X-Admin-Key": FAST_ADMIN_KEY}
    states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
    assert states == {"fake-a": "serving", "fake-b": "available", "fake-a:caps": "serving"}

    def chat(model: str):
        return client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})

    for model, status, code in (("fake-a:nope", 404, "adapter_not_found"),
                                ("fake-a:", 404, "adapter_not_found"),
                                ("fake-a:bad", 422, "adapter_invalid"),
                                ("fake-a:caps", 422, "adapter_incompatible")):
        response = chat(model)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    for body, status, code in (
            ({"model_id": "fake-a", "adapter": "nope"}, 404, "adapter_not_found"),
            ({"model_id": "fake-a", "adapter": "caps"}, 422, "adapter_incompatible"),
            ({"model_id": "fake-b", "adapter": "caps"}, 409, "model_not_loaded"),
            ({"model_id": "fake-a", "adaptor": "caps"}, 400, "invalid_request")):
        response = client.post("/admin/adapters/swap", json=body, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    swap = client.post("/admin/adapters/swap", json={"model_id": "fake-a", "adapter": None},
                       headers=headers)
    assert swap.status_code == 200 and swap.json()["new_adapter"] is None
    assert client.get("/admin/swaps", headers=headers).json()["data"][-1]["kind"] == "adapter"
    ok = chat("fake-a")
    assert ok.status_code == 200 and ok.json()["model"] == "fake-a"
    assert 'semantic_adapter_swaps_total{result="success"} 1.0' in client.get("/metrics").text
