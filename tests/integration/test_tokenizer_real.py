"""The real models' tokenizers, built by models/tokenizer.py, against mlx-lm's
``load_tokenizer`` of the same folders: the same ids, text, streaming text and chat
template, over the short cases and this repository's README (markdown, code, tables,
unicode), and the same token for each of Gemma's 262k ids."""

from __future__ import annotations

import pytest
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

from semantic_server.models.tokenizer import PrebuiltTokenizer, load_tokenizer
from tests.conftest import GEMMA, ROOT, SMOLLM2
from tests.tokenizer_cases import TEXTS, assert_same_tokenizer


@pytest.mark.parametrize("model_id", [GEMMA, SMOLLM2])
def test_same_tokenizer_as_mlx_lm(models_dir, model_id):
    folder = models_dir / model_id
    ours, theirs = load_tokenizer(folder), mlx_load_tokenizer(folder)
    assert isinstance(ours._tokenizer, PrebuiltTokenizer)
    readme = (ROOT / "README.md").read_text()
    assert_same_tokenizer(ours, theirs, [*TEXTS, readme])
