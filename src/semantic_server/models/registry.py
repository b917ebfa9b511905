"""Load and unload the one model this process holds, and prove the memory came back.

One model fits at a time (ADR-007), so the registry holds at most one ``LoadedModel``.
Loading ends with a warm-up forward pass that must give finite logits: a model that loads
but computes garbage is refused here, before it serves anyone. Unloading drops every
reference the registry holds, collects garbage and clears MLX's buffer cache; both report
timings and MLX / process memory so callers (the swap, the experiments) can show that
memory really returns. Call both from the engine thread: they run MLX work.
"""

from __future__ import annotations

import gc
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil

from semantic_server.errors import ModelInvalid, ModelLoadError
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import LayerKind, ModelDims, dims_from_config
from semantic_server.models.fingerprint import weights_fingerprint
from semantic_server.models.tag import ModelTag

TOKENIZERS_KEPT = 4
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class MemorySnapshot:
    active_bytes: int
    peak_bytes: int
    rss_bytes: int

    @classmethod
    def now(cls) -> MemorySnapshot:
        return cls(mx.get_active_memory(), mx.get_peak_memory(),
                   psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class LoadStats:
    seconds: float
    before: MemorySnapshot
    after: MemorySnapshot


@dataclass(frozen=True)
class UnloadStats:
    model_id: str
    seconds: float
    before: MemorySnapshot
    after: MemorySnapshot


@dataclass
class LoadedModel:
    model_id: str
    path: Path
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    tag: ModelTag
    stats: LoadStats

    @property
    def dims(self) -> ModelDims:
        return self.tag.dims


def resolve_compute_dtype(setting: str) -> mx.Dtype | None:
    """float32 on the CPU backend (only float32 matmuls reach BLAS there); None keeps the
    model's own dtype and quantization, which is right on Apple Silicon."""
    if setting == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    return _DTYPES[setting]


def _warm_up(model: Any, tokenizer: Any) -> Any:
    """One short forward pass; returns its cache so the caller can read the KV geometry."""
    cache = model.make_cache()
    prompt = mx.array([tokenizer.encode("Hello")[:8] or [0]])
    logits = model(prompt, cache=cache)
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise ModelLoadError("warm-up produced non-finite logits")
    return cache


def _check_dims(dims: ModelDims, cache: list[Any]) -> ModelDims:
    """The config's dims must describe the cache the model really builds."""
    if len(cache) != dims.n_layers:
        raise ModelInvalid(f"config says {dims.n_layers} layers, the model caches {len(cache)}")
    keys = cache[0].state[0]
    if keys.shape[1] != dims.n_kv_heads or keys.shape[3] != dims.head_dim:
        raise ModelInvalid(f"KV shape {tuple(keys.shape)} does not match the config's dims")
    for i, layer in enumerate(cache):
        sliding = type(layer).__name__ == "RotatingKVCache"
        if sliding != (dims.layers[i].kind is LayerKind.SLIDING):
            raise ModelInvalid(f"layer {i}: config and model disagree on sliding window")
    return ModelDims(dims.n_layers, dims.n_kv_heads, dims.head_dim,
                     str(keys.dtype).removeprefix("mlx.core."), dims.layers)


class ModelRegistry:
    """Holds at most one loaded model."""

    def __init__(self, catalog: ModelCatalog, compute_dtype: str = "auto") -> None:
        self.catalog = catalog
        self.compute_dtype = resolve_compute_dtype(compute_dtype)
        self.current: LoadedModel | None = None
        # Tokenizers are plain Python objects, not MLX memory, and Gemma's takes seconds to
        # build: keep the last few so a model that comes back in a swap loads faster.
        self._tokenizers: OrderedDict[tuple, Any] = OrderedDict()

    def _tokenizer(self, path: Path, config: dict[str, Any]) -> Any:
        from mlx_lm.utils import load_tokenizer

        files = sorted(path.glob("tokenizer*")) + sorted(path.glob("*.jinja"))
        key = (str(path.resolve()), *((f.name, f.stat().st_mtime_ns) for f in files))
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(
                path, eos_token_ids=config.get("eos_token_id"))
            while len(self._tokenizers) > TOKENIZERS_KEPT:
                self._tokenizers.popitem(last=False)
        self._tokenizers.move_to_end(key)
        return self._tokenizers[key]

    def kv_dtype_name(self, config: dict[str, Any]) -> str:
        """The KV dtype a model will have, known before loading it (for a preflight)."""
        if self.compute_dtype is not None:
            return str(self.compute_dtype).removeprefix("mlx.core.")
        return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")

    def load(self, model_id: str) -> LoadedModel:
        """Load ``model_id``, convert it to the compute dtype and warm it up."""
        from mlx_lm.utils import dequantize_model, load_model

        if self.current is not None:
            raise RuntimeError(f"{self.current.model_id} is loaded: unload it first")
        path = self.catalog.resolve(model_id)
        config = self.catalog.read_config(model_id)
        before = MemorySnapshot.now()
        started = time.perf_counter()
        try:
            model, _ = load_model(path, lazy=True)
            tokenizer = self._tokenizer(path, config)
            if self.compute_dtype is not None:
                model = dequantize_model(model)
                model.set_dtype(self.compute_dtype)
            mx.eval(model.parameters())
            cache = _warm_up(model, tokenizer)
        except (ModelLoadError, ModelInvalid):
            raise
        except Exception as exc:  # mlx-lm raises many types for a broken directory
            raise ModelLoadError(f"could not load {model_id!r}: {exc}") from exc
        finally:
            gc.collect()
        kv_dtype = self.kv_dtype_name(config)
        dims = _check_dims(dims_from_config(config, kv_dtype), cache)
        del cache
        tag = ModelTag(model_id, weights_fingerprint(path), dims)
        stats = LoadStats(time.perf_counter() - started, before, MemorySnapshot.now())
        self.current = LoadedModel(model_id, path, model, tokenizer, config, tag, stats)
        return self.current

    def unload(self) -> UnloadStats:
        """Drop the model and give its memory back to the system."""
        if self.current is None:
            raise RuntimeError("no model is loaded")
        before = MemorySnapshot.now()
        started = time.perf_counter()
        model_id = self.current.model_id
        self.current = None
        gc.collect()
        mx.clear_cache()
        return UnloadStats(model_id, time.perf_counter() - started, before, MemorySnapshot.now())
