"""semantic-server: an MLX model server for agents whose KV caches survive model swaps.

Importing the package loads OpenBLAS on Linux before anything imports MLX (see blas.py).
"""

from semantic_server.blas import preload_blas as _preload_blas
from semantic_server.config import Settings as _Settings

_preload_blas(_Settings().blas_library)

__version__ = "0.1.0"
