"""Reproducible experiments (EXP-011..014). Importing the package loads OpenBLAS before any
experiment module imports mlx (directly or through matplotlib's neighbours)."""

import semantic_server  # noqa: F401
