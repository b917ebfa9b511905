"""Which weights a KV cache was computed with, known without loading any model code.

The cache layer tags every file with this, so it lives apart from the registry: reading
and checking cache files never imports MLX model loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from semantic_server.models.dims import ModelDims


@dataclass(frozen=True)
class ModelTag:
    """The model's id, a fingerprint of its weights and its KV geometry."""

    model_id: str
    fingerprint: str
    dims: ModelDims
