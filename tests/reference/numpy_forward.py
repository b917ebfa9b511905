"""Independent float32 NumPy forward pass over a GGUF file, for testing.

This module exists to check the GGUF->MLX importer against something that
shares none of its code. It reads the GGUF tensors with the ``gguf``
package, dequantizes them to float32 and runs a plain causal prefill (no KV
cache) in NumPy. It deliberately imports nothing from ``mlx``, ``mlx_lm`` or
``semantic_server``. If the importer and this module agree, they agree
because both match the architecture, not because they share a bug.

Two architectures are supported:

* ``llama`` (e.g. SmolLM2). llama.cpp's converter permutes the rows of
  ``attn_q`` / ``attn_k`` so that llama.cpp can use interleaved ("GPT-J")
  RoPE. We keep the GGUF row order and apply interleaved RoPE, which is
  mathematically the same as un-permuting and using HF's rotate-half RoPE.
  That is on purpose: the importer has to un-permute, and this reference does
  not, so a wrong un-permutation in the importer shows up as a mismatch.
* ``gemma3`` (text only), following HF Gemma3 / mlx-lm ``gemma3_text``:
  scaled embeddings, q/k norms, sandwich norms, GELU(tanh)-gated MLP, 5 local
  (sliding-window) layers for each global one, each kind with its own RoPE
  base. llama.cpp stores Gemma norm weights as ``1 + w``, so here they are
  used as plain multipliers.

Public API: :func:`reference_logits`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from semantic_server.models.gguf_reader import FastGGUFReader

__all__ = ["reference_logits"]

# Gemma3 values that llama.cpp does not store in the GGUF metadata (HF
# Gemma3TextConfig / mlx-lm defaults for every text-only Gemma 3 size).
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE = 10_000.0
_GEMMA3_QUERY_PRE_ATTN_SCALAR = 256.0


@dataclass(frozen=True)
class _Config:
    """Hyperparameters read from GGUF metadata (plus Gemma3 constants)."""

    arch: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    eps: float
    rope_base: float
    # Gemma3 only; ignored for llama.
    rope_local_base: float = 0.0
    sliding_window: int = 0
    sliding_window_pattern: int = 0


@dataclass
class _Model:
    """Config plus every tensor dequantized to float32 in NumPy (out, in) layout."""

    config: _Config
    weights: dict[str, np.ndarray]


# Dequantizing takes a few seconds per file and tests call the reference
# several times, so weights are kept per resolved path for the process life.
_MODELS: dict[Path, _Model] = {}


def _field(reader: gguf.GGUFReader, key: str, default: object = None) -> object:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise KeyError(f"GGUF metadata key missing: {key}")
        return default
    return field.contents()


def _read_config(reader: gguf.GGUFReader) -> _Config:
    arch = str(_field(reader, "general.architecture"))
    if arch not in ("llama", "gemma3"):
        raise NotImplementedError(f"reference forward does not support {arch!r}")
    if f"{arch}.rope.scaling.type" in reader.fields:
        # Neither test model uses RoPE scaling; refuse instead of being wrong.
        raise NotImplementedError("RoPE scaling is not implemented in the reference")

    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    common = dict(
        arch=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        # Gemma's head_dim (256) is not hidden / n_heads (160), so prefer key_length.
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads)),
        hidden=hidden,
        eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
    )
    if arch == "gemma3":
        return _Config(
            **common,
            rope_local_base=_GEMMA3_ROPE_LOCAL_BASE,
            sliding_window=int(_field(reader, "gemma3.attention.sliding_window")),
            sliding_window_pattern=_GEMMA3_SLIDING_WINDOW_PATTERN,
        )
    return _Config(**common)


@functools.lru_cache(maxsize=2)
def open_reader(path: Path) -> gguf.GGUFReader:
    """One parsed reader per file and process. It is the importer's reader, which only
    parses metadata arrays faster (its tensors are gguf's own; a test checks its fields
    equal the stock reader's): the stock one takes 20 s over Gemma's vocabulary."""
    return FastGGUFReader(path)


def _load(path: str | Path) -> _Model:
    """Dequantize every tensor of ``path`` once and cache the result."""
    key = Path(path).resolve()
    model = _MODELS.get(key)
    if model is None:
        reader = open_reader(key)
        weights = {}
        for tensor in reader.tensors:
            data = dequantize(tensor.data, tensor.tensor_type)
            # GGUF lists dims innermost first ([in, out]); NumPy wants (out, in).
            shape = tuple(int(d) for d in reversed(tensor.shape))
            weights[tensor.name] = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        model = _Model(_read_config(reader), weights)
        _MODELS[key] = model
    return model


# ----------------------------------------------------------------- primitives


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis."""
    scale = 1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(eps))
    return (x * scale * weight).astype(np.float32)


def _rope_angles(n_pos: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape (n_pos, head_dim // 2); pair i rotates at base**(-2i/d)."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rope_interleaved(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """GPT-J style RoPE: rotates adjacent pairs (x[2i], x[2i+1]). x: (H, L, D)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _rope_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX/HF style RoPE: rotates (x[i], x[i + D/2]). x: (H, L, D)."""
    half = x.shape[-1] // 2
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, lo * sin + hi * cos], axis=-1)


def _causal_mask(n: int, window: int | None = None) -> np.ndarray:
    """Boolean (n, n) mask, True where query i may attend to key j.

    Same rule as mlx-lm's ``create_causal_mask``: j <= i, and with a window
    also i - j < window (the query itself plus the window - 1 keys before it).
    """
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    mask = j <= i
    if window is not None:
        mask &= i - j < window
    return mask


def _attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, mask: np.ndarray
) -> np.ndarray:
    """Grouped-query softmax attention.

    q: (H, L, D); k, v: (KV, L, D). Query head h uses KV head h // (H // KV),
    matching the usual repeat-interleave of KV heads. Returns (L, H * D).
    """
    n_heads, n, d = q.shape
    n_kv = k.shape[0]
    qg = q.reshape(n_kv, n_heads // n_kv, n, d)
    scores = (qg * np.float32(scale)) @ k[:, None].swapaxes(-1, -2)  # (KV, rep, L, L)
    scores = np.where(mask, scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = (probs @ v[:, None]).reshape(n_heads, n, d)
    return out.transpose(1, 0, 2).reshape(n, n_heads * d).astype(np.float32)


def _split_heads(x: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """(L, n_heads * head_dim) -> (n_heads, L, head_dim)."""
    return x.reshape(x.shape[0], n_heads, head_dim).transpose(1, 0, 2)


def _bf16_round(value: float) -> np.float32:
    """Round a float32 to the nearest bfloat16 (round-half-to-even), as float32."""
    bits = int(np.array(value, dtype=np.float32).view(np.uint32))
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (HF ``gelu_pytorch_tanh``, mlx ``gelu_approx``)."""
    c = np.float32(math.sqrt(2.0 / math.pi))
    inner = c * (x + np.float32(0.044715) * x * x * x)
    return (0.5 * x * (1.0 + np.tanh(inner))).astype(np.float32)


def _silu(x: np.ndarray) -> np.ndarray:
    return (x / (1.0 + np.exp(-x))).astype(np.float32)


def _output_weight(w: dict[str, np.ndarray]) -> np.ndarray:
    """LM head; both test models tie it to the token embedding."""
    return w.get("output.weight", w["token_embd.weight"])


# ------------------------------------------------------------------- forwards


def _llama_forward(model: _Model, ids: np.ndarray) -> np.ndarray:
    cfg, w = model.config, model.weights
    n = len(ids)
    cos, sin = _rope_angles(n, cfg.head_dim, cfg.rope_base)
    mask = _causal_mask(n)
    scale = cfg.head_dim**-0.5

    h = w["token_embd.weight"][ids]
    for layer in range(cfg.n_layers):
        p = f"blk.{layer}."
        x = _rms_norm(h, w[p + "attn_norm.weight"], cfg.eps)
        # attn_q/attn_k rows are in llama.cpp's permuted order -> interleaved RoPE.
        q = _rope_interleaved(
            _split_heads(x @ w[p + "attn_q.weight"].T, cfg.n_heads, cfg.head_dim), cos, sin
        )
        k = _rope_interleaved(
            _split_heads(x @ w[p + "attn_k.weight"].T, cfg.n_kv_heads, cfg.head_dim), cos, sin
        )
        v = _split_heads(x @ w[p + "attn_v.weight"].T, cfg.n_kv_heads, cfg.head_dim)
        h = h + _attention(q, k, v, scale, mask) @ w[p + "attn_output.weight"].T

        x = _rms_norm(h, w[p + "ffn_norm.weight"], cfg.eps)
        gated = _silu(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)
        h = h + gated @ w[p + "ffn_down.weight"].T

    h = _rms_norm(h, w["output_norm.weight"], cfg.eps)
    return h @ _output_weight(w).T


def _gemma3_forward(model: _Model, ids: np.ndarray) -> np.ndarray:
    cfg, w = model.config, model.weights
    n = len(ids)
    rope_global = _rope_angles(n, cfg.head_dim, cfg.rope_base)
    rope_local = _rope_angles(n, cfg.head_dim, cfg.rope_local_base)
    mask_global = _causal_mask(n)
    mask_local = _causal_mask(n, cfg.sliding_window)
    scale = _GEMMA3_QUERY_PRE_ATTN_SCALAR**-0.5

    # Gemma multiplies embeddings by sqrt(hidden) cast to the checkpoint dtype
    # (bfloat16: sqrt(640) -> 25.25). mlx-lm always rounds it that way (HF does
    # too when run in bfloat16); an exact sqrt would move logits by ~0.3.
    h = w["token_embd.weight"][ids] * _bf16_round(math.sqrt(cfg.hidden))
    for layer in range(cfg.n_layers):
        p = f"blk.{layer}."
        is_global = (layer + 1) % cfg.sliding_window_pattern == 0
        cos, sin = rope_global if is_global else rope_local
        mask = mask_global if is_global else mask_local

        # Norm weights in the GGUF are already (1 + w): use them as they are.
        x = _rms_norm(h, w[p + "attn_norm.weight"], cfg.eps)
        q = _split_heads(x @ w[p + "attn_q.weight"].T, cfg.n_heads, cfg.head_dim)
        k = _split_heads(x @ w[p + "attn_k.weight"].T, cfg.n_kv_heads, cfg.head_dim)
        v = _split_heads(x @ w[p + "attn_v.weight"].T, cfg.n_kv_heads, cfg.head_dim)
        # Per-head q/k RMSNorm before RoPE; Gemma Q/K are not permuted -> rotate-half.
        q = _rope_half(_rms_norm(q, w[p + "attn_q_norm.weight"], cfg.eps), cos, sin)
        k = _rope_half(_rms_norm(k, w[p + "attn_k_norm.weight"], cfg.eps), cos, sin)
        attn = _attention(q, k, v, scale, mask) @ w[p + "attn_output.weight"].T
        h = h + _rms_norm(attn, w[p + "post_attention_norm.weight"], cfg.eps)

        x = _rms_norm(h, w[p + "ffn_norm.weight"], cfg.eps)
        gated = _gelu_tanh(x @ w[p + "ffn_gate.weight"].T) * (x @ w[p + "ffn_up.weight"].T)
        h = h + _rms_norm(
            gated @ w[p + "ffn_down.weight"].T, w[p + "post_ffw_norm.weight"], cfg.eps
        )

    # No final logit soft-capping in Gemma 3 (HF config None, mlx-lm none).
    h = _rms_norm(h, w["output_norm.weight"], cfg.eps)
    return h @ _output_weight(w).T


_FORWARDS = {"llama": _llama_forward, "gemma3": _gemma3_forward}


def reference_logits(gguf_path: str | Path, token_ids: list[int]) -> np.ndarray:
    """Next-token logits at every position of ``token_ids`` (causal prefill).

    Returns a float32 array of shape ``(len(token_ids), vocab)``; row ``i`` is
    the distribution over the token following ``token_ids[: i + 1]``.
    """
    if not token_ids:
        raise ValueError("token_ids must not be empty")
    model = _load(gguf_path)
    ids = np.asarray(token_ids, dtype=np.int64)
    logits = _FORWARDS[model.config.arch](model, ids)
    return np.ascontiguousarray(logits, dtype=np.float32)
