"""One agent's KV cache as one safetensors file, written atomically, read with its tag checked.

Layout (DESIGN.md section 4): ``<cache_dir>/<tag-hash>/tag.json`` describes the tag and
``<cache_dir>/<tag-hash>/<agent-hash>.safetensors`` holds the token ids and each layer's
cache state (mlx-lm's ``state``, trimmed to the tokens in use; a rotating cache's state
carries its window position too), with the tag, agent id, token count, each layer's cache
class and the layout of its state in the metadata. A write goes to a
temporary file in the same folder, is fsynced, then renamed over the old one: a crash
leaves the old file or the new one, never half of one. File names are hashes, so no agent
id can reach outside the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from semantic_server.models.tag import ModelTag

FORMAT_VERSION = 1
TAG_FILE = "tag.json"
HEADER_BYTES_PER_ARRAY = 128  # a safetensors header entry: name, dtype, shape, offsets
_CACHE_CLASSES = {"KVCache": mlx_cache.KVCache, "RotatingKVCache": mlx_cache.RotatingKVCache}


class CacheFileError(Exception):
    """A cache file that cannot be used; the message is the logged reason."""


@dataclass(frozen=True)
class CacheTag:
    """What a cache was computed with; a cache loads only under an equal tag."""

    model_id: str
    fingerprint: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    block_tokens: int
    kv_dtype: str
    layer_windows: tuple[int | None, ...]
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_model(cls, tag: ModelTag, block_tokens: int) -> CacheTag:
        dims = tag.dims
        return cls(tag.model_id, tag.fingerprint, dims.n_layers, dims.n_kv_heads,
                   dims.head_dim, block_tokens, dims.kv_dtype,
                   tuple(layer.window for layer in dims.layers))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheTag:
        data = json.loads(text)
        data["layer_windows"] = tuple(data["layer_windows"])
        return cls(**data)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def shape_key(self) -> tuple:
        """Everything but the model's identity: equal shape keys mean the arrays fit."""
        return (self.n_layers, self.n_kv_heads, self.head_dim, self.kv_dtype,
                self.layer_windows, self.format_version)


@dataclass
class AgentCache:
    """One agent's cache: per-layer mlx-lm cache objects and the tokens they hold; ``tag``
    is set on a cache read from a file (a hot cache's tag is its store's)."""

    agent_id: str
    layers: list[Any]
    tokens: list[int] = field(default_factory=list)
    tag: CacheTag | None = None


def agent_file_name(agent_id: str) -> str:
    return hashlib.sha256(agent_id.encode()).hexdigest()[:32] + ".safetensors"


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows has no directory fsync
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _trimmed_state(layer: Any) -> tuple:
    """A layer's state without the unused tail of its preallocated buffers.

    mlx-lm grows KV buffers in 256-token steps and ``state`` returns the whole buffer, so
    an untrimmed save would write (and pay for) up to 255 unused tokens per layer.
    """
    keys, values = layer.keys, layer.values
    if isinstance(layer, mlx_cache.RotatingKVCache):
        if layer.offset < keys.shape[2]:  # not wrapped yet: positions 0..offset are valid
            keys, values = keys[..., : layer.offset, :], values[..., : layer.offset, :]
            return keys, values, layer.offset, layer.keep, layer.max_size, layer.offset
        return layer.state
    keys, values, *rest = layer.state
    return (keys[..., : layer.offset, :], values[..., : layer.offset, :], *rest)


def _contents(tag: CacheTag, entry: AgentCache) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The arrays and the metadata of ``entry``'s file."""
    arrays: dict[str, mx.array] = {"tokens": mx.array(entry.tokens, dtype=mx.int32)}
    layouts = []  # per layer: its state with each array replaced by "@array"
    for i, layer in enumerate(entry.layers):
        layout = []
        for j, item in enumerate(_trimmed_state(layer)):
            if isinstance(item, mx.array):
                arrays[f"layers.{i}.{j}"] = item
                layout.append("@array")
            else:
                layout.append(item)
        layouts.append(layout)
    metadata = {
        "tag": tag.to_json(),
        "agent_id": entry.agent_id,
        "token_count": str(len(entry.tokens)),
        "written_at": f"{time.time():.3f}",
        "classes": json.dumps([type(layer).__name__ for layer in entry.layers]),
        "layouts": json.dumps(layouts),
    }
    return arrays, metadata


def estimated_file_bytes(tag: CacheTag, entry: AgentCache) -> int:
    """What ``write_cache`` will write for ``entry``, to within a few hundred bytes, known
    before writing (no array is evaluated), so a disk budget can make room first."""
    arrays, metadata = _contents(tag, entry)
    header = len(json.dumps(metadata)) + HEADER_BYTES_PER_ARRAY * len(arrays)
    return sum(array.nbytes for array in arrays.values()) + header


def write_cache(path: Path, tag: CacheTag, entry: AgentCache) -> int:
    """Write one agent's cache to ``path`` atomically; returns the file's size."""
    arrays, metadata = _contents(tag, entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    if read_tag_file(path.parent) != tag:  # missing, or damaged by an older writer
        _write_atomically(path.parent / TAG_FILE, lambda tmp: tmp.write_text(tag.to_json()))
    _write_atomically(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata))
    return path.stat().st_size


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary file beside ``path``, fsync, rename: a crash or a full disk
    leaves the old file or the new one, never part of one."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(temporary)
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_tag_file(folder: Path) -> CacheTag | None:
    """The tag a cache folder was written under; None when its tag file is missing or bad
    (the folder is then skipped by dims reuse, never a reason to fail a request)."""
    try:
        return CacheTag.from_json((folder / TAG_FILE).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def read_summary(path: Path) -> dict[str, Any]:
    """Agent, token count, model and size of a cache file from its header, no arrays read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    tag = CacheTag.from_json(metadata["tag"])
    return {"agent_id": metadata["agent_id"], "tokens": int(metadata["token_count"]),
            "bytes": path.stat().st_size, "model_id": tag.model_id, "tag": tag.digest,
            "written_at": float(metadata["written_at"])}


def read_cache(path: Path) -> AgentCache:
    """Read and check one cache file; any problem is a CacheFileError with the reason."""
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        tag = CacheTag.from_json(metadata["tag"])
        classes = json.loads(metadata["classes"])
        layouts = json.loads(metadata["layouts"])
        tokens = arrays["tokens"].tolist()
        agent_id = metadata["agent_id"]
        count = int(metadata["token_count"])
        states = [tuple(arrays[f"layers.{i}.{j}"] if item == "@array" else item
                        for j, item in enumerate(layout)) for i, layout in enumerate(layouts)]
    except Exception as exc:  # safetensors, JSON and key errors all mean: unreadable
        raise CacheFileError(f"unreadable cache file: {exc}") from exc
    if tag.format_version != FORMAT_VERSION:
        raise CacheFileError(f"format version {tag.format_version}, expected {FORMAT_VERSION}")
    if count != len(tokens) or not len(classes) == len(states) == tag.n_layers:
        raise CacheFileError("token count or layer count does not match the metadata")
    layers = [_layer(name, state, tag) for name, state in zip(classes, states, strict=True)]
    return AgentCache(agent_id, layers, tokens, tag)


def _layer(name: str, state: tuple, tag: CacheTag) -> Any:
    """One layer's cache object, or a CacheFileError: a file whose layouts disagree with its
    classes must be rejected like any other damaged file, not fail the agent's request."""
    if name not in _CACHE_CLASSES:
        raise CacheFileError(f"unknown cache class {name}")
    keys, values = (*state, None, None)[:2]
    if not isinstance(keys, mx.array) or keys.ndim != 4 or keys.shape[1] != tag.n_kv_heads \
            or keys.shape[3] != tag.head_dim:
        shape = tuple(keys.shape) if isinstance(keys, mx.array) else None
        raise CacheFileError(f"KV shape {shape} does not match the tag's dims")
    if not isinstance(values, mx.array) or values.shape[:3] != keys.shape[:3]:
        raise CacheFileError(f"{name} values do not match its keys")
    try:
        return _CACHE_CLASSES[name].from_state(state)
    except (TypeError, ValueError, IndexError) as exc:
        raise CacheFileError(f"{name} state does not rebuild: {exc}") from exc
