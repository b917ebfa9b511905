"""A fingerprint of a model's weights, so a cache is never reused on other weights.

Two models can have the same dims and still be different numbers (a fine-tune, a
re-quantization): their caches fit each other's shapes but would garble the output. The
fingerprint hashes the full contents of every weight file, so one changed weight changes
it. Hashing 100-300 MB costs a fraction of a second, and the result is remembered per
(path, size, mtime) so a model that comes back in a swap is not hashed again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_memo: dict[tuple, str] = {}


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def weights_fingerprint(model_dir: Path) -> str:
    """16 hex digits of BLAKE2b over every ``*.safetensors`` file, in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    key = tuple(_file_key(f) for f in files)
    if key in _memo:
        return _memo[key]
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    _memo[key] = digest.hexdigest()
    return _memo[key]
