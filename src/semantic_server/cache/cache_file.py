"""One agent's KV cache as one safetensors file, written atomically, read with its tag checked.

Layout (DESIGN.md section 4): ``<cache_dir>/<tag-hash>/tag.json`` describes the tag and
``<cache_dir>/<tag-hash>/<agent-hash>.safetensors`` holds the token ids and each layer's
cache state (mlx-lm's ``state``, trimmed to the tokens in use; a rotating cache's state
carries its window position too), with the tag, agent id, token count, each layer's cache
class, the layout of its state and the format its KV is stored in (``disk_format.py``:
native, float16, q8 or q4) in the metadata. With chunking on, the full-attention layers'
complete chunks are in ``<cache_dir>/<tag-hash>/chunks/<chunk-key>.safetensors``
(``prefix_chunks.py``: content-addressed, written once however many agents hold them) and
the agent's file lists them and holds the rest. A write goes to a temporary file in the
same folder, is fsynced, then renamed over the old one: a crash leaves the old file or the
new one, never half of one (chunks are written before the file that lists them). File
names are hashes, so no agent id can reach outside the folder. The folders the server
makes are 0700 and every file it writes 0600, whatever the umask: caches hold what agents
were told.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from semantic_server.cache.disk_format import SUFFIXES, decode, encode
from semantic_server.cache.prefix_chunks import chunk_keys, chunk_path, tenant_of
from semantic_server.config import DiskFormat
from semantic_server.models.tag import ModelTag

FORMAT_VERSION = 2  # 2: a CRC-32 of every array in the metadata
TAG_FILE = "tag.json"
HEADER_BYTES_PER_ARRAY = 128  # a safetensors header entry: name, dtype, shape, offsets
FOLDER_MODE = 0o700  # the cache folders and files: the server's user's alone
FILE_MODE = 0o600
_CACHE_CLASSES = {"KVCache": mlx_cache.KVCache, "RotatingKVCache": mlx_cache.RotatingKVCache}


class CacheFileError(Exception):
    """A cache file whose content cannot be used (it is quarantined); the message is the
    logged reason."""


class CacheReadError(Exception):
    """A cache file that cannot be read right now (a transient I/O failure): a miss."""


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
    # The LoRA adapter the cache was computed under ("name@fingerprint"), None for the base
    # model: an adapter on the attention projections changes the keys and values.
    adapter: str | None = None

    @classmethod
    def for_model(cls, tag: ModelTag, block_tokens: int) -> CacheTag:
        dims = tag.dims
        return cls(tag.model_id, tag.fingerprint, dims.n_layers, dims.n_kv_heads,
                   dims.head_dim, block_tokens, dims.kv_dtype,
                   tuple(layer.window for layer in dims.layers))

    def with_adapter(self, adapter: str | None) -> CacheTag:
        """This model's tag for caches made under ``adapter`` (None: the base model)."""
        return replace(self, adapter=adapter)

    @property
    def base(self) -> CacheTag:
        """The tag of the model itself, whatever the adapter."""
        return self.with_adapter(None)

    def to_json(self) -> str:
        return self._json

    @cached_property
    def _json(self) -> str:  # once per tag: every file and chunk written carries it
        data = asdict(self)
        if data["adapter"] is None:  # the base's digest is what it was before adapters
            del data["adapter"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CacheTag:
        data = json.loads(text)
        data["layer_windows"] = tuple(data["layer_windows"])
        return cls(**data)

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def shape_key(self) -> tuple:
        """Everything but the model's identity: equal shape keys mean the arrays fit."""
        return (self.n_layers, self.n_kv_heads, self.head_dim, self.kv_dtype,
                self.layer_windows, self.format_version)


@dataclass
class AgentCache:
    """One agent's cache: per-layer mlx-lm cache objects and the tokens they hold; ``tag``
    is set on a cache read from a file (a hot cache's tag is its store's).

    ``checkpoint`` is the cache as it was at the end of the agent's last prompt (layers and
    tokens), kept while hot when the cache itself cannot be cut back: a sliding-window
    layer that has wrapped around cannot be trimmed, so without it a retried turn would
    prefill everything again. It is not written to disk.
    """

    agent_id: str
    layers: list[Any]
    tokens: list[int] = field(default_factory=list)
    tag: CacheTag | None = None
    checkpoint: tuple[list[Any], list[int]] | None = None


def agent_file_name(agent_id: str) -> str:
    return hashlib.sha256(agent_id.encode()).hexdigest()[:32] + ".safetensors"


def _fsync(fd: int) -> None:
    """Flush a file to stable storage. On macOS ``fsync`` only reaches the drive's cache;
    ``F_FULLFSYNC`` asks the drive to write it through."""
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:  # a volume that refuses it (FAT, exFAT, network shares)
            pass
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fsync(fd)
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


def _nowhere(key: str) -> bool:
    """No chunk is on disk: a file writes every chunk it lists."""
    return False


@dataclass(frozen=True)
class FileContents:
    """What a cache file holds before it is evaluated: its arrays (a chunked layer's whole,
    cut into chunks when written) and metadata, and which chunks it writes."""

    arrays: dict[str, mx.array]
    metadata: dict[str, str]
    chunked: frozenset[str]  # the arrays whose complete chunks go to chunk files
    chunk_tokens: int
    to_write: tuple[tuple[str, int], ...]  # (key, index) of the chunks not on disk


def _contents(tag: CacheTag, entry: AgentCache, fmt: DiskFormat = DiskFormat.NATIVE,
              chunk_tokens: int | None = None, on_disk: Callable[[str], bool] = _nowhere,
              ) -> FileContents:
    """The arrays and the metadata of ``entry``'s file, its KV stored in ``fmt``. With
    ``chunk_tokens``, the full-attention layers' complete chunks (always leaving the file at
    least one token of its own) go to chunk files, but for those ``on_disk`` says are: a
    sliding-window layer's state depends on where its window stands, so it stays whole."""
    count = len(entry.tokens)
    layers = [i for i, layer in enumerate(entry.layers) if type(layer) is mlx_cache.KVCache]
    keys = chunk_keys(tag.digest, fmt.value, tenant_of(entry.agent_id), entry.tokens,
                      chunk_tokens, limit=(count - 1) // chunk_tokens) \
        if chunk_tokens and layers else []
    arrays: dict[str, mx.array] = {"tokens": mx.array(entry.tokens, dtype=mx.int32)}
    chunked = set()
    layouts = []  # per layer: its state with each array replaced by "@array"
    for i, layer in enumerate(entry.layers):
        layout = []
        for j, item in enumerate(_trimmed_state(layer)):
            if not isinstance(item, mx.array):
                layout.append(item)
                continue
            for suffix, part in encode(item, fmt).items():
                arrays[f"layers.{i}.{j}{suffix}"] = part
                if keys and i in layers:
                    chunked.add(f"layers.{i}.{j}{suffix}")
            layout.append("@array")
        layouts.append(layout)
    metadata = {
        "tag": tag.to_json(),
        "agent_id": entry.agent_id,
        "token_count": str(count),
        "disk_format": fmt.value,
        "written_at": f"{time.time():.3f}",
        "classes": json.dumps([type(layer).__name__ for layer in entry.layers]),
        "layouts": json.dumps(layouts),
        "chunks": json.dumps({"tokens": chunk_tokens, "keys": keys, "layers": layers}
                             if keys else {}),
    }
    return FileContents(arrays, metadata, frozenset(chunked), chunk_tokens or 0,
                        tuple((key, n) for n, key in enumerate(keys) if not on_disk(key)))


def _checksum(array: mx.array) -> int:
    """CRC-32 of an (evaluated, contiguous) array's bytes: cheap enough for every read
    (about 3 GB/s), and enough to tell a damaged file from a good one."""
    if array.dtype == mx.bfloat16:  # NumPy has no bfloat16: the same bytes as uint16
        array = array.view(mx.uint16)
    return zlib.crc32(memoryview(np.asarray(array)))


# safetensors' name of each dtype a cache file holds
_SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16",
                       mx.int32: "I32", mx.uint32: "U32", mx.uint8: "U8"}


@dataclass(frozen=True)
class PreparedFile:
    """A cache file's contents, off the batch's arrays: evaluated, and seen through
    zero-copy buffers that keep them alive, so any thread can write them without an MLX
    call (their data is shared with the cache, so MLX never updates it in place).

    A chunked layer's arrays are whole here: the writer cuts them into the chunk files
    ``to_write`` and the file's own tail (NumPy views, no copy), so the engine thread pays
    the same for a chunked file as for a whole one."""

    tag: CacheTag
    metadata: dict[str, str]
    arrays: list[tuple[str, str, tuple[int, ...], memoryview]]  # name, dtype, shape, bytes
    chunked: frozenset[str] = frozenset()
    chunk_tokens: int = 0
    to_write: tuple[tuple[str, int], ...] = ()

    @property
    def chunk_keys(self) -> list[str]:
        """Every chunk the file lists (on disk already, or to write)."""
        return json.loads(self.metadata["chunks"]).get("keys", [])

    @property
    def tail_start(self) -> int:
        """The first token the file holds itself in its chunked layers."""
        return len(self.chunk_keys) * self.chunk_tokens

    def parts(self, start: int, end: int | None, chunked_only: bool,
              ) -> list[tuple[str, str, np.ndarray]]:
        """The arrays of tokens ``start:end`` of the chunked layers (and the other arrays
        whole, unless ``chunked_only``): views, not copies."""
        parts = []
        for name, dtype, _, view in self.arrays:
            if name in self.chunked:
                parts.append((name, dtype, np.asarray(view)[..., start:end, :]))
            elif not chunked_only:
                parts.append((name, dtype, np.asarray(view)))
        return parts

    def own_bytes(self) -> int:
        """The size of the file itself (its chunks not included), to within a few hundred
        bytes, known before it is written, so a disk budget can make room first."""
        data = sum(view.nbytes // max(1, shape[2]) * (shape[2] - self.tail_start)
                   if name in self.chunked else view.nbytes
                   for name, _, shape, view in self.arrays)
        header = len(json.dumps(self.metadata)) + (HEADER_BYTES_PER_ARRAY + 12) * len(
            self.arrays)
        return data + header

    def chunk_bytes(self) -> int:
        """The size of one of its chunk files, likewise."""
        data = sum(view.nbytes // max(1, shape[2]) * self.chunk_tokens
                   for name, _, shape, view in self.arrays if name in self.chunked)
        return data + len(self.metadata["tag"]) + 200 + (HEADER_BYTES_PER_ARRAY + 12) * len(
            self.chunked)


def prepare_file(tag: CacheTag, entry: AgentCache, fmt: DiskFormat = DiskFormat.NATIVE,
                 chunk_tokens: int | None = None,
                 on_disk: Callable[[str], bool] = _nowhere) -> PreparedFile:
    """The MLX part of a write (engine thread): the KV encoded in ``fmt`` and evaluated
    (chunks of ``chunk_tokens`` tokens that ``on_disk`` says are there are only listed).
    Native KV is not copied (its buffers are viewed with their strides); another format
    costs its conversion here."""
    contents = _contents(tag, entry, fmt, chunk_tokens, on_disk)
    mx.eval(contents.arrays)
    # an array object of its own over the same data: the data is then shared, so MLX
    # never reuses its buffer in place (it would if a cache layer updated its own array
    # with no other holder) while the writer reads it; NumPy has no bfloat16: uint16
    owned = {name: array.view(mx.uint16) if array.dtype == mx.bfloat16 else array[...]
             for name, array in contents.arrays.items()}
    mx.eval(owned)
    views = [(name, _SAFETENSORS_DTYPES[array.dtype], tuple(owned[name].shape),
              memoryview(owned[name])) for name, array in contents.arrays.items()]
    return PreparedFile(tag, contents.metadata, views, contents.chunked,
                        contents.chunk_tokens, contents.to_write)


def write_prepared(path: Path, prepared: PreparedFile) -> int:
    """Write a prepared cache file to ``path`` atomically, with a checksum of every array,
    after its chunk files that are not on disk yet (a chunk's name says its content);
    returns the size of ``path``. No MLX call: any thread may write (the writer does)."""
    tag = prepared.tag
    private_folder(path.parent)
    if read_tag_file(path.parent) != tag:  # missing, or damaged by an older writer
        write_atomically(path.parent / TAG_FILE, lambda tmp: tmp.write_text(tag.to_json()))
    step = prepared.chunk_tokens
    for key, n in prepared.to_write:
        target = chunk_path(path.parent, key)
        if not target.exists():
            private_folder(target.parent)
            metadata = {"tag": prepared.metadata["tag"], "chunk": key,
                        "disk_format": prepared.metadata["disk_format"],
                        "tokens": f"{n * step}:{(n + 1) * step}"}
            _write_arrays(target, metadata, prepared.parts(n * step, (n + 1) * step, True))
    _write_arrays(path, prepared.metadata, prepared.parts(prepared.tail_start, None, False))
    return path.stat().st_size


def _write_arrays(path: Path, metadata: dict[str, str],
                  parts: list[tuple[str, str, np.ndarray]]) -> None:
    buffers = [(name, dtype, np.ascontiguousarray(data)) for name, dtype, data in parts]
    checksums = {name: zlib.crc32(memoryview(data).cast("B")) for name, _, data in buffers}
    header: dict[str, Any] = {"__metadata__": {**metadata, "checksums": json.dumps(checksums)}}
    offset = 0
    for name, dtype, data in buffers:
        header[name] = {"dtype": dtype, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    def write(temporary: Path) -> None:
        with temporary.open("wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little") + encoded)
            for _, _, data in buffers:
                handle.write(memoryview(data).cast("B"))

    write_atomically(path, write)


def write_cache(path: Path, tag: CacheTag, entry: AgentCache,
                fmt: DiskFormat = DiskFormat.NATIVE, chunk_tokens: int | None = None,
                on_disk: Callable[[str], bool] = _nowhere) -> int:
    """Write one agent's cache to ``path`` atomically, its KV in ``fmt`` (and in chunks of
    ``chunk_tokens``), with a checksum of every array; returns the size of ``path``."""
    return write_prepared(path, prepare_file(tag, entry, fmt, chunk_tokens, on_disk))


def private_folder(folder: Path) -> None:
    """Make ``folder``, and its parents that are missing, readable by the server's user
    alone (0700, whatever the umask); a folder that exists is left as it is."""
    missing = []
    above = folder
    while not above.exists():
        missing.append(above)
        above = above.parent
    for made in reversed(missing):
        try:
            made.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            continue  # another thread made it (and sets its mode)
        os.chmod(made, FOLDER_MODE)  # mkdir's mode is masked by the umask
    if not folder.is_dir():  # a file where the folder goes
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` to a temporary file beside ``path``, fsync, rename: a crash or a full disk
    leaves the old file or the new one, never part of one. The file is 0600 (whatever the
    umask) from before its first byte: ``write`` opens it with its mode already set."""
    # the pid (a file a killed process left is found at startup) and the thread: two
    # threads writing one path never share a temporary file
    temporary = path.with_name(
        f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits off, or a killed
        finally:  # process left this name with another mode
            os.close(fd)
        write(temporary)
        with temporary.open("rb+") as handle:
            _fsync(handle.fileno())
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
    """Agent, token count, model, size and chunks of a cache file from its header, no
    arrays read."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = handle.metadata() or {}
    tag = CacheTag.from_json(metadata["tag"])
    return {"agent_id": metadata["agent_id"], "tokens": int(metadata["token_count"]),
            "bytes": path.stat().st_size, "model_id": tag.model_id, "tag": tag.digest,
            "written_at": float(metadata["written_at"]),
            "chunks": json.loads(metadata.get("chunks", "{}")).get("keys", [])}


class ChunkDamaged(CacheFileError):
    """A chunk file whose content is wrong: it is deleted, so a later write makes it again."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _load(path: Path, missing: type[Exception]) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A safetensors file's arrays and metadata; a file not found raises ``missing``."""
    try:
        with path.open("rb") as handle:
            return mx.load(handle, format="safetensors", return_metadata=True)
    except FileNotFoundError as exc:
        raise missing(f"{path.name} is gone: {exc}") from exc
    except OSError as exc:
        raise CacheReadError(f"cannot read {path.name} now: {exc}") from exc
    except Exception as exc:  # the safetensors parser's errors all mean: damaged
        raise CacheFileError(f"unreadable cache file: {exc}") from exc


def _read_chunk(folder: Path, key: str, tag: CacheTag, span: str) -> dict[str, mx.array]:
    """Chunk ``key``'s arrays, checked: its checksums, its name, its tag and the tokens it
    holds (``span``, "start:end"). A chunk missing or wrong is ``ChunkDamaged``: the store
    forgets it, so the next write that lists it makes it again."""
    path = chunk_path(folder, key)
    try:
        arrays, metadata = _load(path, CacheFileError)  # missing: damaged, below
        _verify_checksums(arrays, json.loads(metadata["checksums"]))
        if (metadata["chunk"] != key or metadata["tokens"] != span
                or CacheTag.from_json(metadata["tag"]) != tag):
            raise CacheFileError("a chunk file holds another chunk")
    except CacheReadError:
        raise
    except Exception as exc:
        raise ChunkDamaged(f"chunk {key}: {exc}", path) from exc
    return arrays


def _stored(arrays: dict[str, mx.array], name: str, fmt: DiskFormat,
            dtype: mx.Dtype) -> mx.array:
    return decode({s: arrays[f"{name}{s}"] for s in SUFFIXES if f"{name}{s}" in arrays},
                  fmt, dtype)


def _chunk_parts(folder: Path, tag: CacheTag, keys: list[str], chunk_tokens: int,
                 ) -> list[dict[str, mx.array]]:
    return [_read_chunk(folder, key, tag, f"{n * chunk_tokens}:{(n + 1) * chunk_tokens}")
            for n, key in enumerate(keys)]


def read_prefix(folder: Path, tag: CacheTag, fmt: DiskFormat, keys: list[str],
                chunk_tokens: int) -> list[Any]:
    """The cache of the tokens chunks ``keys`` (of ``chunk_tokens`` tokens) hold, of one
    tag whose every layer is full attention: a new agent's start from a prefix other
    agents wrote."""
    parts = _chunk_parts(folder, tag, keys, chunk_tokens)
    dtype = getattr(mx, tag.kv_dtype)
    layers = []
    try:
        for i in range(tag.n_layers):
            keys_, values = (mx.concatenate([_stored(part, f"layers.{i}.{j}", fmt, dtype)
                                             for part in parts], axis=2) for j in (0, 1))
            if keys_.shape[2] != len(keys) * chunk_tokens or values.shape != keys_.shape:
                raise ValueError(f"{keys_.shape[2]} positions in {len(keys)} chunks")
            layers.append(mlx_cache.KVCache.from_state((keys_, values, keys_.shape[2])))
    except (KeyError, ValueError, TypeError) as exc:
        raise CacheFileError(f"chunks that do not make a cache: {exc}") from exc
    return layers


def read_cache(path: Path) -> AgentCache:
    """Read and check one cache file, with the chunks it lists.

    A file that cannot be read right now (too many open files, an I/O error, no
    permission, deleted meanwhile) is a ``CacheReadError``: a miss, the file stays. A file
    whose content is wrong (truncated, zeroed, a checksum that does not match, shapes or
    counts that disagree with its metadata, a chunk missing or damaged) is a
    ``CacheFileError`` with the reason.
    """
    arrays, metadata = _load(path, CacheReadError)
    try:
        _verify_checksums(arrays, json.loads(metadata["checksums"]))
        tag = CacheTag.from_json(metadata["tag"])
        classes = json.loads(metadata["classes"])
        layouts = json.loads(metadata["layouts"])
        tokens = arrays["tokens"].tolist()
        agent_id = metadata["agent_id"]
        count = int(metadata["token_count"])
        fmt = DiskFormat(metadata.get("disk_format", DiskFormat.NATIVE.value))
        dtype = getattr(mx, tag.kv_dtype)
        chunking = json.loads(metadata.get("chunks", "{}"))
        keys = chunking.get("keys", [])
        if keys != chunk_keys(tag.digest, fmt.value, tenant_of(agent_id), tokens,
                              chunking.get("tokens", 1), limit=len(keys)):
            raise CacheFileError("the chunks listed are not those of the file's tokens")
        parts = _chunk_parts(path.parent, tag, keys, chunking.get("tokens", 1))
        chunked = set(chunking.get("layers", []))

        def state(i: int, j: int) -> mx.array:
            name = f"layers.{i}.{j}"
            own = _stored(arrays, name, fmt, dtype)
            if i not in chunked:
                return own
            return mx.concatenate([_stored(part, name, fmt, dtype) for part in parts]
                                  + [own], axis=2)

        states = [tuple(state(i, j) if item == "@array" else item
                        for j, item in enumerate(layout)) for i, layout in enumerate(layouts)]
    except (CacheFileError, CacheReadError):  # a chunk's own verdict
        raise
    except Exception as exc:  # JSON, key and type errors all mean: not one of our files
        raise CacheFileError(f"bad cache file metadata: {exc}") from exc
    if tag.format_version != FORMAT_VERSION:
        raise CacheFileError(f"format version {tag.format_version}, expected {FORMAT_VERSION}")
    if count != len(tokens) or not len(classes) == len(states) == tag.n_layers:
        raise CacheFileError("token count or layer count does not match the metadata")
    layers = [_layer(name, state, tag, window, count) for name, state, window
              in zip(classes, states, tag.layer_windows, strict=True)]
    return AgentCache(agent_id, layers, tokens, tag)


def _verify_checksums(arrays: dict[str, mx.array], expected: dict[str, int]) -> None:
    if set(arrays) != set(expected):
        raise CacheFileError("the file's arrays are not the ones its checksums list")
    for name, array in arrays.items():
        if _checksum(array) != expected[name]:
            raise CacheFileError(f"checksum mismatch in {name}: the file is damaged")


def _layer(name: str, state: tuple, tag: CacheTag, window: int | None, count: int) -> Any:
    """One layer's cache object, or a CacheFileError: a file whose layouts disagree with its
    classes, its tag or its token count must be rejected like any other damaged file, never
    reach the batch."""
    if name not in _CACHE_CLASSES:
        raise CacheFileError(f"unknown cache class {name}")
    keys, values, offset, *rest = (*state, None, None, None)[:max(3, len(state))]
    if not isinstance(keys, mx.array) or keys.ndim != 4 or keys.shape[1] != tag.n_kv_heads \
            or keys.shape[3] != tag.head_dim:
        shape = tuple(keys.shape) if isinstance(keys, mx.array) else None
        raise CacheFileError(f"KV shape {shape} does not match the tag's dims")
    if not isinstance(values, mx.array) or values.shape[:3] != keys.shape[:3]:
        raise CacheFileError(f"{name} values do not match its keys")
    if offset != count:
        raise CacheFileError(f"{name} holds {offset} tokens, the file {count}")
    rotating = name == "RotatingKVCache"
    if rotating != (window is not None) or (rotating and rest[1] != window):
        raise CacheFileError(f"{name} does not match the tag's window {window}")
    if keys.shape[2] > count or (not rotating and keys.shape[2] != count):
        raise CacheFileError(f"{name} has {keys.shape[2]} positions for {count} tokens")
    try:
        return _CACHE_CLASSES[name].from_state(state)
    except (TypeError, ValueError, IndexError) as exc:
        raise CacheFileError(f"{name} state does not rebuild: {exc}") from exc
