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

import json
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


# How llguidance writes JSON here: compact, keys in the schema's order; and ``oneOf`` taken
# as ``anyOf`` (llguidance cannot check "exactly one"; the answer still matches at least one
# branch, and coding agents' tools use oneOf: Qwen Code's refused every request without it).
JSON_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A grammar for JSON matching ``schema`` as ``bounded_schema`` closes it, compact and
    with keys in the schema's order, so the same value always comes out as the same text
    (and the same tokens next turn)."""
    return llguidance.LLMatcher.grammar_from_json_schema(bounded_schema(schema),
                                                         defaults=JSON_OPTIONS)


# ---- what a schema leaves open, closed so that an answer ends -----------------------------
INTEGER_LIMIT = 10**18  # an integer: at most 19 digits, within an int64
SIGNIFICANT_DIGITS = 17  # a number: as many as a float64 needs to round-trip...
MOST_DECIMALS = 10  # ...and at most 10 after the point (llguidance's multipleOf: 1e-10 at most)
_NUMBER_SCALES = [  # below 10**e in magnitude with 17 - e decimals, in plain decimal
    {"exclusiveMinimum": -10**e, "exclusiveMaximum": 10**e,
     "multipleOf": float(f"1e-{SIGNIFICANT_DIGITS - e}") if e < SIGNIFICANT_DIGITS else 1}
    for e in range(SIGNIFICANT_DIGITS - MOST_DECIMALS, SIGNIFICANT_DIGITS + 1)]
_SHARED = {  # a plain number or integer: one definition every such property refers to, so
    # llguidance compiles its (large) lexeme once per grammar, not once per property
    "number": ("semantic-server-number", {"type": "number", "anyOf": _NUMBER_SCALES}),
    "integer": ("semantic-server-integer", {"type": "integer", "minimum": -INTEGER_LIMIT,
                                            "maximum": INTEGER_LIMIT})}
_ANNOTATIONS = {"type", "title", "description", "default", "examples", "$comment",
                "deprecated", "readOnly", "writeOnly"}
_OBJECT_WORDS = {"properties", "patternProperties", "required", "additionalProperties",
                 "unevaluatedProperties", "minProperties", "maxProperties"}
_LEFT_OPEN = {"additionalProperties", "unevaluatedProperties", "anyOf", "oneOf", "allOf",
              "$ref"}


def bounded_schema(schema: Any) -> Any:
    """``schema`` with what it leaves open closed, as OpenAI's strict mode closes tool
    arguments, so that a model cannot write on forever; whatever it writes still validates
    against ``schema`` as given:

    - an object takes no properties beyond those it declares unless it asks for them
      (``additionalProperties`` true or a schema), at every depth. An object made of
      ``allOf``/``anyOf``/``oneOf``/``$ref`` beside keywords of its own is left as it is
      (closing one part would refuse the properties of the others);
    - a number is plain decimal of at most 17 significant digits (at most 10 decimals,
      below 10**17), an integer has at most 19 digits (within an int64), inside any bounds
      the schema sets;
    - llguidance's ``x-guidance`` options are dropped: the JSON is compact.

    An untyped schema (any JSON value) stays what it asks for.
    """
    nested_id = isinstance(schema, dict) and '"$id"' in json.dumps(
        {key: value for key, value in schema.items() if key != "$id"})
    shared: set[str] | None = None if nested_id else set()  # (a nested $id: other "#"s)
    out = _bounded(schema, True, shared)
    if shared:
        out = {**out, "$defs": {**out.get("$defs", {}),
                                **dict(_SHARED[kind] for kind in sorted(shared))}}
    return out


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and "properties" in node)


def _bounded(node: Any, closable: bool, shared: set[str] | None) -> Any:
    """``node`` bounded; ``closable``: it stands alone (not a part that ``allOf``, or the
    object keywords beside an ``anyOf``, merge with others); ``shared``: the shared
    definitions referred to so far (None: refer to none)."""
    if not isinstance(node, dict):
        return node  # true, false
    out = {key: value for key, value in node.items() if key != "x-guidance"}
    kinds = out.get("type")
    if isinstance(kinds, list) and len(kinds) > 1 and {"number", "integer"} & set(kinds):
        # a branch per type, so a number's bounds apply to the number alone
        defs = {key: out.pop(key) for key in ("$defs", "definitions") if key in out}
        return _bounded({**defs, "anyOf": [{**out, "type": kind} for kind in kinds]},
                        closable, shared)
    number = kinds if isinstance(kinds, str) and kinds in _SHARED else None
    if number and shared is not None and out.keys() <= _ANNOTATIONS:
        shared.add(number)
        return {"$ref": f"#/$defs/{_SHARED[number][0]}"}
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _bounded(value, True, shared) for name, value in out[key].items()}
    for key in ("items", "additionalProperties", "additionalItems", "contains"):
        if isinstance(out.get(key), dict):
            out[key] = _bounded(out[key], True, shared)
    alone = not (_OBJECT_WORDS & out.keys() or _is_object(out))
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        if isinstance(out.get(key), list):
            part = (key in ("prefixItems", "items")
                    or (alone and (key != "allOf" or len(out[key]) == 1)))
            out[key] = [_bounded(value, part, shared) for value in out[key]]
    if closable and _is_object(out) and not _LEFT_OPEN & out.keys():
        out["additionalProperties"] = False
    if number and "enum" not in out and "const" not in out:
        _bound_number(out, number)
    return out


def _bound_number(node: dict[str, Any], kind: str) -> None:
    """A number or integer with constraints of its own, bounded inside them."""
    limit = INTEGER_LIMIT if kind == "integer" else 10**SIGNIFICANT_DIGITS
    if "minimum" not in node and "exclusiveMinimum" not in node:
        node["minimum"] = -limit
    if "maximum" not in node and "exclusiveMaximum" not in node:
        node["maximum"] = limit
    if kind == "number" and "multipleOf" not in node:  # (a multipleOf bounds the decimals)
        if "anyOf" in node:
            node["allOf"] = [*node.get("allOf", []), {"anyOf": _NUMBER_SCALES}]
        else:
            node["anyOf"] = _NUMBER_SCALES


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
