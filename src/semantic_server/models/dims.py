"""The shape of a model's KV cache, which decides whether a saved cache fits a model.

Two models can share a cache file only if every layer's keys and values have the same
shape and meaning, so the dims list each layer's cache kind too: a sliding-window layer
keeps only its last ``window`` tokens, a global layer keeps them all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class LayerKind(StrEnum):
    """How one layer's KV cache grows."""

    GLOBAL = "global"
    SLIDING = "sliding"


@dataclass(frozen=True)
class LayerCache:
    kind: LayerKind
    window: int | None = None


@dataclass(frozen=True)
class ModelDims:
    """KV cache geometry: what a cache file is tagged with and a BlockPool is sized by."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    kv_dtype: str
    layers: tuple[LayerCache, ...]

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.kv_dtype]

    @property
    def bytes_per_token(self) -> int:
        """Keys plus values of one token over every layer (sliding layers included)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    def cache_bytes(self, tokens: int) -> int:
        """Bytes a cache of ``tokens`` tokens holds: sliding layers stop at their window."""
        per_layer_token = 2 * self.n_kv_heads * self.head_dim * self.dtype_bytes
        return per_layer_token * sum(min(tokens, layer.window or tokens) for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [{"kind": layer.kind.value, "window": layer.window}
                          for layer in self.layers]
        return data


def _layer_kinds(config: dict[str, Any], n_layers: int) -> tuple[LayerCache, ...]:
    window = config.get("sliding_window")
    if config.get("layer_types"):
        return tuple(LayerCache(LayerKind.SLIDING, window) if t == "sliding_attention"
                     else LayerCache(LayerKind.GLOBAL) for t in config["layer_types"])
    pattern = config.get("sliding_window_pattern")
    if pattern and window:
        # gemma3: every pattern-th layer is global, the rest slide (mlx-lm's make_cache).
        return tuple(LayerCache(LayerKind.GLOBAL) if i % pattern == pattern - 1
                     else LayerCache(LayerKind.SLIDING, window) for i in range(n_layers))
    return tuple(LayerCache(LayerKind.GLOBAL) for _ in range(n_layers))


def dims_from_config(config: dict[str, Any], kv_dtype: str) -> ModelDims:
    """Dims from a model's config.json, so a swap can check a target before loading it."""
    config = {**config.get("text_config", {}), **config}
    try:
        n_layers = int(config["num_hidden_layers"])
        n_heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"config.json lacks the attention geometry ({exc})") from exc
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    if kv_dtype not in _DTYPE_BYTES:
        raise ValueError(f"unsupported KV dtype {kv_dtype}")
    return ModelDims(n_layers, n_kv, head_dim, kv_dtype, _layer_kinds(config, n_layers))
