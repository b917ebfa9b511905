"""Constrained decoding: a grammar (llguidance) as a per-request logits processor.

mlx-lm's BatchGenerator takes logits processors per sequence, so a constrained request and
a free one share a batch; only the constrained row's logits are masked. The mask comes
from llguidance's matcher, which follows the tokens the model actually samples; it is
applied with plain MLX ops (llguidance's own MLX kernel is Metal-only, and the CPU backend
has none). ADR-012 records why llguidance.

A grammar is compiled (and a bad one refused, with llguidance's reason) before the
request reaches the engine; the tokenizer view llguidance needs is built once per model
tokenizer, off the event loop.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import mlx.core as mx
import numpy as np

from semantic_server.errors import InvalidRequest

_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (mlx-lm's wrapper or a Hugging Face fast
    tokenizer), built once per tokenizer: about a second for SmolLM2's 49k tokens, so call
    it off the event loop."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    with _tokenizers_lock:
        if hf not in _tokenizers:
            _tokenizers[hf] = llguidance.hf.from_tokenizer(hf)
        return _tokenizers[hf]


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar for JSON matching ``schema``, compact and with keys in the schema's order,
    so the same value always comes out as the same text (and the same tokens next turn)."""
    return llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False})


def check_grammar(grammar: str, tokenizer: Any, param: str) -> None:
    """A 400 naming the problem when llguidance cannot compile ``grammar``."""
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if error:
        raise InvalidRequest(f"{param} cannot be used: {error}", param=param,
                             code="invalid_schema")


class GrammarProcessor:
    """Masks every token the grammar does not allow next; once the grammar is complete only
    end-of-sequence is allowed, so the generation ends there.

    mlx-lm calls a processor with the sequence's recent tokens (the last one just sampled,
    or on the first call the prompt's last) and the row's logits.
    """

    def __init__(self, tokenizer: Any, grammar: str, vocab_size: int) -> None:
        lltok = ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        self.bitmask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
        self.vocab_size = vocab_size
        self.eos = sorted(tokenizer.eos_token_ids)
        self._started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self._started = True
        return mx.where(mx.array(self.allowed()), logits, -mx.inf)

    def allowed(self) -> np.ndarray:
        """The tokens allowed next, as a boolean mask the size of the logits."""
        allowed = np.zeros(self.vocab_size, dtype=bool)
        if self.matcher.is_error():  # cannot happen for sampled tokens; end cleanly if so
            allowed[self.eos] = True
            return allowed
        llnp.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").astype(bool)
        n = min(len(bits), self.vocab_size)
        allowed[:n] = bits[:n]
        return allowed
