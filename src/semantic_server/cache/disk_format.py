"""How a cache file stores its KV arrays: as computed, in float16, or quantized.

On the CPU backend KV is float32 (46 KB a token for SmolLM2), four times what a 4-bit copy
takes; the system this project reproduces keeps its caches in 4-bit on disk. The format is
chosen for writing (``SEMANTIC_CACHE_DISK_FORMAT``) and recorded in every file's header,
so every reader reads every format, whatever the setting is now:

* ``native``: the arrays as computed, bit for bit (the default: a restore is lossless);
* ``float16``: half of float32, about 3 significant digits;
* ``q8`` / ``q4``: MLX affine quantization along the head dimension, in groups of 32
  values, each group with its own scale and bias (``mx.quantize``); a head dimension that
  is not a multiple of 32 is stored in float16 instead.

A lossy format changes what a restored agent computes next; how much is measured (greedy
agreement after a restore), not assumed.
"""

from __future__ import annotations

import mlx.core as mx

from semantic_server.config import DiskFormat

GROUP_SIZE = 32  # values per quantization group (head dims are multiples of it)
BITS = {DiskFormat.Q8: 8, DiskFormat.Q4: 4}


# The arrays one KV array becomes, by the suffix of their names in the file.
QUANTIZED_PARTS = (".q", ".scales", ".biases")


SUFFIXES = ("", *QUANTIZED_PARTS)  # every name suffix a stored KV array can have


def encode(array: mx.array, fmt: DiskFormat) -> dict[str, mx.array]:
    """The arrays ``array`` is stored as, by name suffix."""
    if fmt is DiskFormat.NATIVE:
        return {"": array}
    if fmt not in BITS or array.shape[-1] % GROUP_SIZE:
        return {"": array.astype(mx.float16)}
    parts = mx.quantize(array.astype(mx.float32), group_size=GROUP_SIZE, bits=BITS[fmt])
    return dict(zip(QUANTIZED_PARTS, parts, strict=True))


def decode(parts: dict[str, mx.array], fmt: DiskFormat, dtype: mx.Dtype) -> mx.array:
    """The KV array in ``dtype`` from what :func:`encode` stored."""
    if "" in parts:
        return parts[""].astype(dtype)
    if fmt not in BITS:
        raise ValueError(f"quantized arrays in a {fmt} file")
    quantized, scales, biases = (parts[suffix] for suffix in QUANTIZED_PARTS)
    return mx.dequantize(quantized, scales, biases, group_size=GROUP_SIZE,
                         bits=BITS[fmt]).astype(dtype)
