"""A bad GGUF fails with one line naming the problem and leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFWriter

from semantic_server.cli import main
from semantic_server.errors import GGUFImportError
from semantic_server.models.gguf_import import import_gguf
from tests.conftest import SMOLLM2


def _assert_fails_cleanly(source, tmp_path, expected):
    out = tmp_path / "models"
    with pytest.raises(GGUFImportError) as info:
        import_gguf(source, out / "imported")
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert not out.exists() or not any(out.iterdir()), "a failed import left files behind"


def test_truncated_file(gguf_path, tmp_path):
    source = gguf_path(SMOLLM2)
    truncated = tmp_path / "truncated.gguf"
    with source.open("rb") as full:
        truncated.write_bytes(full.read(source.stat().st_size // 2))
    _assert_fails_cleanly(truncated, tmp_path, "truncated")


def test_not_a_gguf_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 certainly not a GGUF file" * 100)
    _assert_fails_cleanly(junk, tmp_path, "not a readable GGUF file")


def test_unsupported_architecture(tmp_path):
    source = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(source), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_fails_cleanly(source, tmp_path, "unsupported architecture 'mamba'")


def test_cli_prints_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_MODELS_DIR", str(tmp_path / "models"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(SystemExit) as info:
        main(["models", "import", str(junk), "--name", "junk"])
    assert str(info.value).startswith("semantic-server: ") and "\n" not in str(info.value)
    assert not (tmp_path / "models" / "junk").exists()
