"""The cache identity covers every number a model computes with: its weights, the numerics
of its config.json and the version of the importer that wrote it."""

from __future__ import annotations

import json

from semantic_server.models.fingerprint import weights_fingerprint

CONFIG = {"num_hidden_layers": 2, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}


def _model(folder, config=CONFIG, importer=2, weights=b"\1\2\3\4"):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "import.json").write_text(json.dumps({"importer_version": importer}))
    return folder


def test_same_numbers_same_fingerprint_whatever_the_formatting(tmp_path):
    a = _model(tmp_path / "a")
    b = _model(tmp_path / "b")
    (b / "config.json").write_text(json.dumps(dict(reversed(CONFIG.items())), indent=4))
    assert weights_fingerprint(a) == weights_fingerprint(b)


def test_other_weights_numerics_or_importer_give_another_fingerprint(tmp_path):
    base = weights_fingerprint(_model(tmp_path / "base"))
    others = [
        _model(tmp_path / "weights", weights=b"\1\2\3\5"),
        _model(tmp_path / "rope", config={**CONFIG, "rope_theta": 10000.0}),
        _model(tmp_path / "window", config={**CONFIG, "sliding_window": 512}),
        _model(tmp_path / "importer", importer=3),
    ]
    fingerprints = {weights_fingerprint(folder) for folder in others}
    assert base not in fingerprints and len(fingerprints) == len(others)


def test_a_config_edited_in_place_is_noticed(tmp_path):
    folder = _model(tmp_path / "m")
    before = weights_fingerprint(folder)
    (folder / "config.json").write_text(json.dumps({**CONFIG, "rms_norm_eps": 1e-6}))
    assert weights_fingerprint(folder) != before
