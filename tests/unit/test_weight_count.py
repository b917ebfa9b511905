"""The memory plan counts a model's weights from its safetensors headers, so a quantized
model with mixed bits (an imported GGUF) is neither over- nor undercounted."""

from __future__ import annotations

import mlx.core as mx
import pytest

from semantic_server.models.weight_count import weight_count
from semantic_server.swap.orchestrator import CONVERSION_SHARE, WARM_UP_SHARE, estimated_bytes

QUANTIZATION = {"group_size": 32, "bits": 4, "embed": {"group_size": 32, "bits": 8},
                "wide": {"group_size": 64, "bits": 4}}


def _mixed_model(folder) -> int:
    """A folder like an imported GGUF's: an 8-bit embedding, 4-bit layers of two group
    sizes, a float norm; returns how many weights it holds."""
    tensors = {}
    for name, shape, bits, group in (("embed", (256, 64), 8, 32), ("proj", (64, 128), 4, 32),
                                     ("wide", (32, 256), 4, 64)):
        weight, scales, biases = mx.quantize(mx.ones(shape), group_size=group, bits=bits)
        tensors |= {f"{name}.weight": weight, f"{name}.scales": scales,
                    f"{name}.biases": biases}
    tensors["norm.weight"] = mx.ones((64,))
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    return 256 * 64 + 64 * 128 + 32 * 256 + 64


def test_mixed_bits_are_counted_per_layer(tmp_path):
    count = _mixed_model(tmp_path)
    assert weight_count(tmp_path, QUANTIZATION) == count
    size = (tmp_path / "model.safetensors").stat().st_size
    assert estimated_bytes(tmp_path, {"quantization": QUANTIZATION}, 4) == int(
        count * 4 * (1 + WARM_UP_SHARE) + size * CONVERSION_SHARE)
    assert estimated_bytes(tmp_path, {"quantization": QUANTIZATION}, None) == int(
        size * (1 + WARM_UP_SHARE))  # kept in the files' own dtype


def test_a_file_without_a_header_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="no safetensors header"):
        weight_count(tmp_path)


def test_a_header_that_lists_no_shape_is_refused(tmp_path):
    header = b'{"w": {"dtype": "F32"}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="malformed"):
        weight_count(tmp_path)


def test_weights_already_in_the_compute_dtype_are_not_counted_twice(tmp_path):
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.ones((256, 64))})
    size = (tmp_path / "model.safetensors").stat().st_size
    assert estimated_bytes(tmp_path, {}, 4) == int(256 * 64 * 4 * (1 + WARM_UP_SHARE))
    assert estimated_bytes(tmp_path, {}, 2) == int(
        256 * 64 * 2 * (1 + WARM_UP_SHARE) + size * CONVERSION_SHARE)  # float32 to 16
