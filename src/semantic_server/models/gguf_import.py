"""Import a GGUF file into an MLX model directory that ``mlx_lm.load`` accepts.

This machine has no model hub, but PyPI ships real models as GGUF files. The import keeps
the file's quantization where MLX can hold it exactly (see ``gguf_blocks``), rebuilds
the tokenizer from the GGUF metadata without torch, and undoes llama.cpp's two rewrites
of the weights: the Q/K row permutation of llama models and Gemma's stored ``1 + w`` norms.
The directory is written under a temporary name and renamed at the end, so a failed
import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants
from safetensors.numpy import save_file
from tqdm import tqdm

from semantic_server.errors import GGUFImportError
from semantic_server.models.gguf_blocks import GROUP_SIZE, decode_exact, is_exact
from semantic_server.models.gguf_reader import FastGGUFReader

IMPORTER_VERSION = 2
MANIFEST = "import.json"
_DENSE = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
}

# GGUF tensor names -> mlx-lm parameter paths, shared by every supported architecture.
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Architecture:
    """What differs between GGUF architectures: config keys, names, and weight fixes."""

    model_type: str
    layer_names: dict[str, str]
    build_config: Callable[[Callable[[str], Any]], dict[str, Any]]
    unpermute_qk: bool = False
    norms_stored_plus_one: bool = False
    extra_names: dict[str, str] = field(default_factory=dict)


def _llama_config(get: Callable[[str], Any]) -> dict[str, Any]:
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("rope.dimension_count", hidden // heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length"),
        "rope_traditional": False,
    }


def _gemma3_config(get: Callable[[str], Any]) -> dict[str, Any]:
    # sliding_window_pattern, rope_local_base_freq and query_pre_attn_scalar are not
    # stored in GGUF; these are Gemma 3's published values.
    return {
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "head_dim": get("attention.key_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": 6,
        "max_position_embeddings": get("context_length"),
    }


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        model_type="llama",
        layer_names={**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"},
        build_config=_llama_config,
        unpermute_qk=True,
    ),
    "gemma3": Architecture(
        model_type="gemma3_text",
        layer_names={
            **_LAYER_NAMES,
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        build_config=_gemma3_config,
        norms_stored_plus_one=True,
    ),
}


@dataclass(frozen=True)
class ImportResult:
    """What an import produced, for the CLI and the fetch script to report."""

    path: Path
    seconds: float
    bytes_on_disk: int
    as_float16: list[str]


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    fld = reader.fields.get(key)
    return default if fld is None else fld.contents()


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    try:
        reader = FastGGUFReader(path)
    except Exception as exc:  # the gguf package raises many types for a damaged file
        raise GGUFImportError(f"{path}: not a readable GGUF file ({exc})") from exc
    expected = reader.data_offset + sum(int(t.n_bytes) for t in reader.tensors)
    if path.stat().st_size < expected:
        raise GGUFImportError(
            f"{path}: truncated GGUF file ({path.stat().st_size} of {expected} bytes)")
    return reader


def _mlx_name(name: str, arch: Architecture) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in arch.layer_names:
        return f"model.layers.{parts[1]}.{arch.layer_names[parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise GGUFImportError(f"unsupported tensor {name!r} for architecture {arch.model_type}")


def _unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of Q/K rows (its RoPE pairs adjacent dims)."""
    out = rows.shape[0]
    half = out // n_heads // 2
    return rows.reshape(n_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _dense(raw: np.ndarray, qtype: GGMLQuantizationType, shape: list[int]) -> np.ndarray:
    """A tensor MLX cannot hold quantized as it is: float types as they are, other
    quantizations (Q6_K's 16-weight sub-blocks, ...) dequantized to float16."""
    if qtype in _DENSE:
        return raw.reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return quants.dequantize(raw, qtype).reshape(shape).astype(np.float16)


def _convert_tensors(reader: GGUFReader, arch: Architecture, config: dict[str, Any],
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """Every GGUF tensor as MLX arrays, plus the per-layer quantization map."""
    weights: dict[str, np.ndarray] = {}
    quant: dict[str, Any] = {}
    as_float16: list[str] = []
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in tqdm(reader.tensors, desc="converting", unit="tensor", leave=False):
        name = _mlx_name(tensor.name, arch)
        kind = tensor.name.split(".")[-2]
        shape = [int(d) for d in reversed(tensor.shape)]
        qtype = tensor.tensor_type
        raw = np.asarray(tensor.data)
        if is_exact(qtype):
            if len(shape) != 2:
                raise GGUFImportError(f"tensor {tensor.name}: quantized shape {shape} "
                                      "not supported")
            affine = decode_exact(raw, qtype, *shape)
            parts = {"weight": affine.weight, "scales": affine.scales, "biases": affine.biases}
            if arch.unpermute_qk and kind in heads:
                parts = {k: _unpermute_rows(v, heads[kind]) for k, v in parts.items()}
            module = name.removesuffix(".weight")
            for key, value in parts.items():
                weights[f"{module}.{key}"] = np.ascontiguousarray(value)
            quant[module] = {"group_size": GROUP_SIZE, "bits": affine.bits, "mode": "affine"}
            continue
        dense = _dense(raw, qtype, shape)
        if qtype not in _DENSE:
            as_float16.append(f"{tensor.name} ({qtype.name} -> float16)")
        if arch.norms_stored_plus_one and kind.endswith("norm"):
            dense = dense.astype(np.float32) - 1.0
        if arch.unpermute_qk and kind in heads:
            dense = _unpermute_rows(dense, heads[kind])
        weights[name] = np.ascontiguousarray(dense)
    return weights, quant, as_float16


def _tokenizer_files(reader: GGUFReader, gguf_arch: str, chat_template: str | None,
                     ) -> tuple[str, dict[str, Any]]:
    """``tokenizer.json`` text and ``tokenizer_config.json`` from the GGUF metadata."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    spec = {name: _field(reader, f"tokenizer.{key}")
            for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
            if f"tokenizer.{key}" in reader.fields}
    if "tokens" not in spec:
        raise GGUFImportError("the GGUF file has no tokenizer vocabulary")
    backend, _ = convert_gguf_tokenizer(gguf_arch, spec)
    tokens = spec["tokens"]

    def token(key: str) -> str | None:
        index = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    # Whether BOS is prepended is the post-processor's decision, not the config flag's:
    # write it into tokenizer.json so every loader agrees (Gemma degrades without BOS).
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token",
                          spec.get("tokenizer_type") == "llama"))
    bos = token("bos_token_id")
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": int(_field(reader, f"{gguf_arch}.context_length", 2048)),
    }
    template = chat_template or _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return backend.to_str(), config


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The import record of ``model_dir``, or None when it is missing or unreadable."""
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def import_gguf(gguf_path: Path, dest: Path, chat_template: Path | None = None,
                overwrite: bool = False) -> ImportResult:
    """Convert ``gguf_path`` into the MLX model directory ``dest``."""

    started = time.perf_counter()
    gguf_path, dest = Path(gguf_path), Path(dest)
    if dest.exists() and not overwrite:
        raise GGUFImportError(f"{dest} already exists (pass overwrite to replace it)")
    reader = _open(gguf_path)
    gguf_arch = _field(reader, "general.architecture")
    arch = ARCHITECTURES.get(gguf_arch)
    if arch is None:
        raise GGUFImportError(f"unsupported architecture {gguf_arch!r} "
                              f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    try:
        template = Path(chat_template).read_text() if chat_template else None
    except (OSError, UnicodeDecodeError) as exc:
        raise GGUFImportError(f"cannot read the chat template {chat_template}: {exc}") from exc

    def get(key: str, default: Any = None) -> Any:
        value = _field(reader, f"{gguf_arch}.{key}", default)
        if value is None:
            raise GGUFImportError(f"missing metadata {gguf_arch}.{key}")
        return value

    config = {"model_type": arch.model_type, **arch.build_config(get)}
    weights, quant, as_float16 = _convert_tensors(reader, arch, config)
    vocab = weights["model.embed_tokens.weight"].shape[0]
    tokenizer_json, tokenizer_config = _tokenizer_files(reader, gguf_arch, template)
    config.update(
        vocab_size=vocab,
        tie_word_embeddings="lm_head.weight" not in weights,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        quantization={"group_size": GROUP_SIZE, "bits": 4, "mode": "affine", **quant},
    )
    manifest = {
        "importer_version": IMPORTER_VERSION,
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "source_sha256": _sha256(gguf_path),
        "gguf_architecture": gguf_arch,
        "as_float16": as_float16,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()
        if template else None,
    }

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is not secret
    try:
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "tokenizer.json").write_text(tokenizer_json)
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in dest.iterdir())
    return ImportResult(dest, time.perf_counter() - started, size, as_float16)
