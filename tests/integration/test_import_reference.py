"""Numerical proof of the importer: the imported models' logits match an independent
NumPy forward pass over the GGUF's own dequantized tensors."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.registry import ModelRegistry
from tests.conftest import GEMMA, SMOLLM2
from tests.reference.numpy_forward import reference_logits

TEXT = (
    "The history of the city goes back many centuries. Merchants came from the coast, "
    "scholars from the mountains, and each left something behind: a market, a library, "
    "a bridge over the river that still carries traffic today. "
)

# Gemma's prompt is longer than its 512-token sliding window: below it, a missing or
# wrong window would change nothing.
CASES = {SMOLLM2: (2, 1e-3), GEMMA: (12, 0.05)}


@pytest.mark.parametrize("model_id", [SMOLLM2, GEMMA])
def test_logits_match_numpy_reference(model_id, models_dir, gguf_path):
    repeats, tolerance = CASES[model_id]
    registry = ModelRegistry(ModelCatalog(models_dir))
    loaded = registry.load(model_id)
    tokens = loaded.tokenizer.encode(TEXT * repeats)
    ours = np.array(loaded.model(mx.array([tokens]))[0].astype(mx.float32))
    registry.unload(loaded)
    reference = reference_logits(gguf_path(model_id), tokens)
    difference = float(np.abs(ours - reference).max())
    agree = ours.argmax(-1) == reference.argmax(-1)
    print(f"{model_id}: {len(tokens)} tokens, max |logit difference| {difference:.2e}, "
          f"argmax agrees at {agree.sum()}/{len(tokens)} positions")
    assert agree.all()
    assert difference < tolerance
