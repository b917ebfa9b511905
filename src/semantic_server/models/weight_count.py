"""How many weights a model folder holds, read from its safetensors headers.

A memory plan needs the weights' count, not the files' size: an imported GGUF keeps its
layers at different bits (Gemma 3's 8-bit embedding holds 63% of its weights, its other
layers 4 to 6 bits), so a size divided by one bit width is far off. A header names every
tensor's shape without reading a weight; a quantized weight's count comes from its scales'
shape and its layer's group size (``config["quantization"]``, per layer where set).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def read_header(path: Path, limit: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """A safetensors file's header: tensor name -> dtype, shape, offsets (ValueError when the
    file is not one, or its header is over ``limit`` bytes)."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if not 0 < length <= limit:
            raise ValueError(f"{path.name} has no safetensors header (one of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ValueError(f"{path.name} has a header that is not JSON") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a malformed safetensors header")
    return header


def weight_files(folder: Path) -> list[Path]:
    """The files mlx-lm loads a model's weights from."""
    return sorted(folder.glob("model*.safetensors"))


def weight_count(folder: Path, quantization: dict[str, Any] | None = None) -> int:
    """The number of weights in ``folder``'s weight files (a quantized weight counted once,
    its scales and biases not at all); a ValueError for a header that says otherwise."""
    quantization = quantization or {}
    default_group = quantization.get("group_size", 64)
    count = 0
    try:
        for path in weight_files(folder):
            header = read_header(path)
            for name, info in header.items():
                if name == "__metadata__" or name.endswith((".scales", ".biases")):
                    continue
                shape = info["shape"]
                layer = name.removesuffix(".weight")
                scales = header.get(f"{layer}.scales") if name.endswith(".weight") else None
                if scales is None:
                    count += math.prod(shape)
                    continue
                own = quantization.get(layer)
                group = own.get("group_size", default_group) if isinstance(own, dict) \
                    else default_group
                count += math.prod(shape[:-1]) * scales["shape"][-1] * group
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"a malformed safetensors header: {exc!r}") from exc
    return count
