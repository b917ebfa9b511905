"""The block decoders reproduce gguf's own dequantization exactly, on the real models'
tensors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from gguf import quants

from semantic_server.models.gguf_blocks import decode_exact, is_exact
from tests.conftest import GEMMA, SMOLLM2
from tests.reference.numpy_forward import open_reader


def _smallest_tensor_of_each_type(path):
    smallest = {}
    for tensor in open_reader(path.resolve()).tensors:
        kind = tensor.tensor_type
        if kind.name not in ("F32", "F16") and (
                kind not in smallest or tensor.n_elements < smallest[kind].n_elements):
            smallest[kind] = tensor
    return list(smallest.values())


@pytest.mark.parametrize("model_id", [SMOLLM2, GEMMA])
def test_decoders_match_gguf_dequantize(model_id, gguf_path):
    tensors = [t for t in _smallest_tensor_of_each_type(gguf_path(model_id))
               if is_exact(t.tensor_type)]
    assert len(tensors) >= 2, "expected several exactly-mappable quantization types"
    for tensor in tensors:
        rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
        reference = quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, cols)
        affine = decode_exact(tensor.data, tensor.tensor_type, rows, cols)
        got = np.array(mx.dequantize(mx.array(affine.weight), mx.array(affine.scales),
                                     mx.array(affine.biases), group_size=32, bits=affine.bits))
        print(f"{tensor.name} {tensor.tensor_type.name} -> {affine.bits} bits")
        assert np.array_equal(got, reference)
