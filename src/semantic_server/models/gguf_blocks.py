"""GGUF quantized blocks -> MLX affine quantization, bit for bit where the formats agree.

GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K all describe each run of 32 weights as
``scale * q + bias`` with unsigned integers ``q`` of 4, 5 or 8 bits, which is exactly MLX's
affine quantization with group size 32. Decoding the blocks into ``(q, scales, biases)``
and repacking ``q`` keeps the model the size it was and its values exact. Scales and biases
are kept in float32: a K-quant's ``d * sub_scale`` needs up to 17 mantissa bits, more than
float16 holds. Q6_K (16-weight sub-blocks) and every other type have no exact MLX
form; the importer
stores those as float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

GROUP_SIZE = 32
# A block type decoded: integer values, per-group scales and biases, bits per value.
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray, int]


@dataclass(frozen=True)
class AffineTensor:
    """One matrix in MLX's affine layout: packed uint32 weights, per-group scales and biases."""

    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


def _f16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 values (the fp16 ``d`` / ``m`` of a block)."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml packs element j in the low nibble of byte j and element j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """The fifth bit of each of ``count`` elements, from little-endian bytes."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[..., :count]


def _q4_0(b: np.ndarray) -> Decoded:
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18]), d, -8.0 * d, 4


def _q4_1(b: np.ndarray) -> Decoded:
    return _nibbles(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4


def _q5_0(b: np.ndarray) -> Decoded:
    d = _f16(b[..., 0:2])
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6], 32) << 4)
    return q, d, -16.0 * d, 5


def _q5_1(b: np.ndarray) -> Decoded:
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8], 32) << 4)
    return q, _f16(b[..., 0:2]), _f16(b[..., 2:4]), 5


def _q8_0(b: np.ndarray) -> Decoded:
    d = _f16(b[..., 0:2])
    q = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128.0 * d, 8


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs of a K-quant super-block (ggml's get_scale_min_k4)."""
    low_sc, low_m, high = s[..., 0:4] & 63, s[..., 4:8] & 63, s[..., 8:12]
    high_sc = (high & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    high_m = (high >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = np.concatenate([low_sc, high_sc], axis=-1).astype(np.float32)
    m = np.concatenate([low_m, high_m], axis=-1).astype(np.float32)
    return sc, m


def _k_values(qs: np.ndarray) -> np.ndarray:
    """K-quants store 64 weights per 32 bytes: low nibbles first, then high nibbles."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.concatenate([chunks & 0x0F, chunks >> 4], axis=-1).reshape(*qs.shape[:-1], 256)


def _k_affine(d: np.ndarray, dmin: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc, m = _k_scales(s)
    return d[..., None] * sc, -(dmin[..., None] * m)


def _q4_k(b: np.ndarray) -> Decoded:
    scales, biases = _k_affine(_f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:16])
    return _k_values(b[..., 16:144]), scales, biases, 4


def _q5_k(b: np.ndarray) -> Decoded:
    scales, biases = _k_affine(_f16(b[..., 0:2]), _f16(b[..., 2:4]), b[..., 4:16])
    low = _k_values(b[..., 48:176])
    # qh byte l holds bit 2j (chunk j, low half) and bit 2j+1 (chunk j, high half) of element l.
    bits = np.unpackbits(b[..., 16:48, None], axis=-1, bitorder="little")  # (..., 32, 8)
    high = bits.swapaxes(-1, -2).reshape(*b.shape[:-1], 256)
    return low | (high << 4), scales, biases, 5


# type -> (block bytes, weights per block, decoder)
_DECODERS = {
    Q.Q4_0: (18, 32, _q4_0),
    Q.Q4_1: (20, 32, _q4_1),
    Q.Q5_0: (22, 32, _q5_0),
    Q.Q5_1: (24, 32, _q5_1),
    Q.Q8_0: (34, 32, _q8_0),
    Q.Q4_K: (144, 256, _q4_k),
    Q.Q5_K: (176, 256, _q5_k),
}


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit integers into uint32 words the way MLX does.

    MLX reads a row as one little-endian bit stream: element i occupies bits
    [i * bits, (i + 1) * bits). Checked against ``mx.dequantize`` for 2-8 bits.
    """
    rows, n = q.shape
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4), dtype=np.uint8).view(np.uint32)
    stream = ((q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = np.packbits(stream.reshape(rows, n * bits // 8, 8), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed.reshape(rows, -1)).view(np.uint32)


def is_exact(qtype: Q) -> bool:
    """Whether ``qtype`` maps onto MLX affine quantization without loss."""
    return qtype in _DECODERS


def decode_exact(raw: np.ndarray, qtype: Q, rows: int, cols: int) -> AffineTensor:
    """Re-express the raw blocks of a (rows, cols) matrix in MLX's affine layout, losslessly."""
    block_bytes, per_block, decoder = _DECODERS[qtype]
    blocks = raw.reshape(rows, cols // per_block, block_bytes)
    q, scales, biases, bits = decoder(blocks)
    q = q.reshape(rows, cols).astype(np.uint8)
    groups = cols // GROUP_SIZE
    return AffineTensor(
        weight=pack(q, bits),
        scales=np.ascontiguousarray(scales.reshape(rows, groups), dtype=np.float32),
        biases=np.ascontiguousarray(biases.reshape(rows, groups), dtype=np.float32),
        bits=bits,
    )
