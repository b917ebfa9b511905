"""The bit packing of the block decoders matches MLX's quantized layout."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from semantic_server.models.gguf_blocks import pack


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    q = np.random.default_rng(bits).integers(0, 2**bits, (4, 64)).astype(np.uint8)
    ones, zeros = mx.ones((4, 2)), mx.zeros((4, 2))
    unpacked = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    assert np.array_equal(np.array(unpacked).astype(np.uint8), q)
