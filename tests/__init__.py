"""Test package. Importing it first loads OpenBLAS before any test module imports mlx."""

import semantic_server  # noqa: F401
