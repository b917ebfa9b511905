"""A fingerprint of a model's numerics, so a cache is never reused on other numbers.

Two models can have the same dims and still compute different keys and values: a
fine-tune or a re-quantization (other weights), or the same weights with other numerics in
``config.json`` (rope base, norm epsilon, window, attention scalars) or converted by
another version of our GGUF importer. Their caches fit each other's shapes but would
garble the output. The fingerprint hashes the full contents of every weight file, the
whole ``config.json`` (canonical JSON, so formatting does not count) and the importer
version recorded in ``import.json``; any change changes it. Hashing 100-300 MB costs a
fraction of a second, and the result is remembered per file version so a model that comes
back in a swap is not hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from semantic_server.models.gguf_import import MANIFEST

_memo: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _canonical_json(path: Path) -> bytes:
    """The file's JSON with sorted keys, or its raw bytes when it is not JSON."""
    raw = path.read_bytes()
    try:
        return json.dumps(json.loads(raw), sort_keys=True).encode()
    except ValueError:
        return raw


def weights_fingerprint(model_dir: Path, config_name: str = "config.json") -> str:
    """16 hex digits of BLAKE2b over every ``*.safetensors`` file (in name order), the
    canonical config (``config.json``, or an adapter's ``adapter_config.json``) and the
    importer version."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    numerics = [p for p in (model_dir / config_name, model_dir / MANIFEST) if p.exists()]
    key = tuple(_file_key(f) for f in (*files, *numerics))
    if key in _memo:
        return _memo[key]
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    config = model_dir / config_name
    if config.exists():
        digest.update(config_name.encode() + _canonical_json(config))
    manifest = model_dir / MANIFEST
    if manifest.exists():
        try:
            version = json.loads(manifest.read_text()).get("importer_version")
        except ValueError:
            version = None
        digest.update(f"importer {version}".encode())
    _memo[key] = digest.hexdigest()
    return _memo[key]
