"""Load and unload models, and prove the memory came back.

The registry holds the resident models: usually one, two during a zero-downtime swap (the
serving model and the target loading beside it, ADR-013). Loading ends with a warm-up
forward pass that must give finite logits: a model that loads but computes garbage is
refused here, before it serves anyone. A load can also run in slices (``load_slices``) so
the engine thread decodes for the serving model between them. Unloading drops every
reference the registry holds, collects garbage and clears MLX's buffer cache; both report
timings and MLX / process memory so callers (the swap, the experiments) can show that
memory really returns. Run MLX work (loads, unloads, health checks) on the engine thread;
``prepare`` (config and tokenizer, no MLX) may run anywhere.
"""

from __future__ import annotations

import gc
import itertools
import time
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import psutil
from mlx.utils import tree_flatten

from semantic_server.errors import ModelInvalid, ModelLoadError
from semantic_server.models.adapters import Adapter, AdapterCatalog
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import LayerKind, ModelDims, dims_from_config
from semantic_server.models.fingerprint import weights_fingerprint
from semantic_server.models.lora import PreparedLora, prepare_lora, prepared_bytes
from semantic_server.models.tag import ModelTag

TOKENIZERS_KEPT = 4
SLICE_BYTES = 4 * 2**20  # weights evaluated per slice of a sliced load
HEALTH_TOKENS = 4  # tokens a health check generates
_versions = itertools.count(1)
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
class Prepared:
    """What a load needs that is not MLX work: the model's folder, config, tokenizer and
    the adapters trained on it (its LoRA layers are prepared for them)."""

    model_id: str
    path: Path
    config: dict[str, Any]
    tokenizer: Any
    adapters: tuple[Adapter, ...] = ()


@dataclass(frozen=True)
class UnloadStats:
    model_id: str
    seconds: float
    before: MemorySnapshot
    after: MemorySnapshot


@dataclass(eq=False)  # one load of a model: compared (and hashed) by identity
class LoadedModel:
    model_id: str
    path: Path
    model: Any
    tokenizer: Any
    config: dict[str, Any]
    tag: ModelTag
    stats: LoadStats
    weight_bytes: int = 0  # bytes of its parameters in the compute dtype
    version: int = field(default_factory=lambda: next(_versions))  # which load this is
    lora: PreparedLora | None = None  # its adapter layers, when adapters exist for it

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


def _slices(arrays: list[mx.array], nbytes: int) -> list[list[mx.array]]:
    """``arrays`` in consecutive groups of about ``nbytes`` each."""
    groups: list[list[mx.array]] = [[]]
    size = 0
    for array in arrays:
        if size >= nbytes:
            groups.append([])
            size = 0
        groups[-1].append(array)
        size += array.nbytes
    return groups


def _large_quantized(model: Any) -> dict[str, Any]:
    """The quantized layers whose float weights would take more than a few slices (an
    embedding table, a tied output head), by name."""
    import mlx.nn as nn

    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.QuantizedLinear | nn.QuantizedEmbedding)
            and module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits * 4
            > 4 * SLICE_BYTES}


def _dequantize_in_slices(quantized: Any, dtype: mx.Dtype) -> Generator[None, None, mx.array]:
    """A quantized layer's weights in ``dtype``, computed a band of rows per slice (the
    same operations as a whole-matrix dequantize, so the same values)."""
    weight, rows = quantized.weight, quantized.weight.shape[0]
    row_bytes = weight.shape[1] * 32 // quantized.bits * 4
    step = max(1, SLICE_BYTES // row_bytes)
    bands = []
    for start in range(0, rows, step):
        band = mx.dequantize(weight[start:start + step], quantized.scales[start:start + step],
                             quantized.biases[start:start + step], quantized.group_size,
                             quantized.bits, quantized.mode).astype(dtype)
        mx.eval(band)
        bands.append(band)
        yield
    dense = mx.concatenate(bands)
    del bands
    mx.eval(dense)
    return dense


def run_slices(slices: Generator[None, None, Any]) -> Any:
    """Run a sliced task to its end at once; its return value."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return done.value


class ModelRegistry:
    """Holds the resident models."""

    def __init__(self, catalog: ModelCatalog, compute_dtype: str = "auto",
                 adapters: AdapterCatalog | None = None, lora_slots: int = 4,
                 lora_max_rank: int | None = None) -> None:
        """``adapters``: where a model's adapters are found when it loads; its LoRA layers
        get ``lora_slots`` slots (slot 0 is "no adapter") of the largest rank among them,
        or of ``lora_max_rank`` (0: never prepare LoRA layers)."""
        self.catalog = catalog
        self.compute_dtype = resolve_compute_dtype(compute_dtype)
        self.adapters = adapters
        self.lora_slots = lora_slots
        self.lora_max_rank = lora_max_rank
        self.resident: list[LoadedModel] = []
        # Tokenizers are plain Python objects, not MLX memory, and Gemma's takes seconds to
        # build (its BPE merges, in Rust): keep the last few so a model that comes back in a
        # swap loads faster.
        self._tokenizers: OrderedDict[tuple, Any] = OrderedDict()

    def _tokenizer(self, path: Path, config: dict[str, Any]) -> Any:
        from semantic_server.models.tokenizer import load_tokenizer

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

    def health_check(self, loaded: LoadedModel) -> Generator[None, None, None]:
        """A short greedy generation whose every step must give finite logits, one token
        per slice: proof that the model computes before anyone is sent to it."""
        cache = loaded.model.make_cache()
        tokens = mx.array([loaded.tokenizer.encode("The capital of France is")[:16] or [0]])
        for _ in range(HEALTH_TOKENS):
            logits = loaded.model(tokens, cache=cache)[:, -1, :]
            if not bool(mx.all(mx.isfinite(logits)).item()):
                raise ModelLoadError("the health check produced non-finite logits")
            tokens = mx.argmax(logits, axis=-1, keepdims=True)
            yield

    def prepare(self, model_id: str) -> Prepared:
        """Resolve ``model_id`` and build its tokenizer (Python work, no MLX)."""
        path = self.catalog.resolve(model_id)
        config = self.catalog.read_config(model_id)
        try:
            tokenizer = self._tokenizer(path, config)
        except Exception as exc:  # a broken tokenizer file: the model cannot load
            raise ModelLoadError(f"could not load {model_id!r}: {exc}") from exc
        return Prepared(model_id, path, config, tokenizer, self._adapters_of(model_id))

    def _adapters_of(self, model_id: str) -> tuple[Adapter, ...]:
        """The usable adapters trained on ``model_id`` (reads their folders)."""
        listings = self.adapters.available() if self.adapters is not None else []
        return tuple(listing.adapter for listing in listings
                     if listing.adapter is not None and listing.adapter.base_model == model_id)

    def lora_bytes(self, model_id: str) -> int:
        """What ``model_id``'s prepared LoRA layers will take (reads the adapters' folders:
        off the event loop)."""
        dtype = self.compute_dtype.size if self.compute_dtype is not None else 4
        return prepared_bytes(list(self._adapters_of(model_id)), model_id, self.lora_slots,
                              self.lora_max_rank, dtype)

    def load(self, model_id: str) -> LoadedModel:
        """Load ``model_id``, convert it to the compute dtype and warm it up, all at once."""
        return run_slices(self.load_slices(self.prepare(model_id)))

    def load_slices(self, prepared: Prepared) -> Generator[None, None, LoadedModel]:
        """Load a prepared model in slices of about ``SLICE_BYTES`` of weights each, so the
        engine thread can decode for the serving model between them; returns the model."""
        from mlx_lm.utils import dequantize_model, load_model

        model_id = prepared.model_id
        mx.reset_peak_memory()  # so the load's stats show its own peak
        before = MemorySnapshot.now()
        started = time.perf_counter()
        try:
            model, _ = load_model(prepared.path, lazy=True)
            if self.compute_dtype is not None:
                large = _large_quantized(model)
                model = dequantize_model(model)
                model.set_dtype(self.compute_dtype)
                dense = dict(model.named_modules())
                for name, quantized in large.items():  # not one long stall for a big table
                    dense[name].weight = yield from _dequantize_in_slices(
                        quantized, self.compute_dtype)
                del large, dense
            weights = [array for _, array in tree_flatten(model.parameters())]
            for group in _slices(weights, SLICE_BYTES):
                yield
                mx.eval(group)
            yield
            lora = prepare_lora(model, list(prepared.adapters), model_id, self.lora_slots,
                                self.lora_max_rank)
            cache = _warm_up(model, prepared.tokenizer)
        except (ModelLoadError, ModelInvalid):
            raise
        except Exception as exc:  # mlx-lm raises many types for a broken directory
            raise ModelLoadError(f"could not load {model_id!r}: {exc}") from exc
        finally:
            gc.collect()
        dims = _check_dims(dims_from_config(prepared.config,
                                            self.kv_dtype_name(prepared.config)), cache)
        del cache
        tag = ModelTag(model_id, weights_fingerprint(prepared.path), dims)
        stats = LoadStats(time.perf_counter() - started, before, MemorySnapshot.now())
        loaded = LoadedModel(model_id, prepared.path, model, prepared.tokenizer,
                             prepared.config, tag, stats,
                             sum(a.nbytes for a in weights) + (lora.nbytes if lora else 0),
                             lora=lora)
        self.resident.append(loaded)
        return loaded

    def unload(self, loaded: LoadedModel) -> UnloadStats:
        """Drop ``loaded``'s weights and give their memory back to the system. The handle
        itself may live on (in a swap's history, say): it no longer holds the weights."""
        if loaded not in self.resident:
            raise RuntimeError(f"{loaded.model_id} is not loaded")
        before = MemorySnapshot.now()
        started = time.perf_counter()
        self.resident.remove(loaded)
        loaded.model = None
        loaded.lora = None
        gc.collect()
        mx.clear_cache()
        return UnloadStats(loaded.model_id, time.perf_counter() - started, before,
                           MemorySnapshot.now())
