"""semantic-server: an MLX model server for agents whose KV caches survive model swaps.

Importing the package loads OpenBLAS on Linux before anything imports MLX (see blas.py).
"""

from semantic_server.blas import preload_blas as _preload_blas
from semantic_server.config import Settings as _Settings

try:
    _blas_setting = _Settings().blas_library
except ValueError:  # a bad SEMANTIC_* value: reported in one line where the settings are read
    _blas_setting = "auto"
_preload_blas(_blas_setting)

__version__ = "0.1.0"
