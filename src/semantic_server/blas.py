"""Load OpenBLAS into the process before MLX on Linux.

The ``mlx[cpu]`` wheel links a bundled reference BLAS that runs float32 matmuls at about
5 GFLOP/s. Its BLAS symbols are resolved dynamically, so a BLAS loaded earlier with
``RTLD_GLOBAL`` takes their place and the same matmuls run 15-40x faster. This must run
before the first ``import mlx``; ``semantic_server/__init__.py`` calls it. Nothing here
runs on macOS, where MLX uses Accelerate and the GPU.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

# Debian/Ubuntu paths of the pthread OpenBLAS (package libopenblas0-pthread), then others.
_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

HINT = "install OpenBLAS for fast float32 matmuls: sudo apt-get install libopenblas0-pthread"


@dataclass(frozen=True)
class BlasStatus:
    """Which BLAS MLX will use, for the startup log and /health."""

    name: str
    path: str | None
    detail: str


_status: BlasStatus | None = None


def _find_openblas() -> str | None:
    return next((path for path in _CANDIDATES if Path(path).exists()), None)


def preload_blas(setting: str) -> BlasStatus:
    """Load the BLAS named by ``setting`` ('auto', 'off' or a path) once per process."""
    global _status
    if _status is not None:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus("platform", None, "MLX uses the platform BLAS")
    elif setting == "off":
        _status = BlasStatus("reference", None, "OpenBLAS disabled by SEMANTIC_BLAS_LIBRARY=off")
    elif "mlx" in sys.modules:
        _status = BlasStatus("reference", None, "mlx was imported before OpenBLAS could load")
    else:
        path = _find_openblas() if setting == "auto" else setting
        if path is None:
            _status = BlasStatus("reference", None, f"no OpenBLAS found; {HINT}")
        else:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                _status = BlasStatus("openblas", path, f"OpenBLAS loaded from {path}")
            except OSError as exc:
                _status = BlasStatus("reference", None, f"could not load {path}: {exc}; {HINT}")
    return _status


def blas_status() -> BlasStatus:
    """The status recorded when the package was imported (its ``__init__`` preloads)."""
    if _status is None:
        raise RuntimeError("preload_blas has not run")
    return _status
