"""A model's tokenizer, built from one pass of the Rust tokenizers library.

mlx-lm's ``load_tokenizer`` takes 7-8 s for Gemma 3's tokenizer (262k tokens, 515k BPE
merges, a 14 MB tokenizer.json) where reading its 308 MB of weights takes 0.2 s. The Rust
build of the tokenizer is about 2.5 s of it; the rest is Python around that build: mlx-lm
parses the whole tokenizer.json only to pick a streaming detokenizer, transformers parses
it again for its added tokens, and mlx-lm's wrapper then reads the 262k-entry vocabulary
out of Rust three times (0.6 s each) and has its detokenizer convert every id to its
token one call at a time.

For the folders the GGUF importer writes (a tokenizer.json that AutoTokenizer wraps in
transformers' generic fast tokenizer, and a tokenizer_config.json of a few known keys),
``load_tokenizer`` builds the same objects around one Rust build: the added tokens and
the decoder are read from it, the vocabulary once, and mlx-lm's own functions still choose
the streaming detokenizer and the tool parser. Any other folder goes through mlx-lm as
before. Nothing is cached beside the model: the slow part left is the Rust build of the BPE
merges (it holds the GIL), which has no faster form than tokenizer.json: built from Python
lists it still took three quarters of the time, and Gemma's merges hold newlines, which a
merges.txt cannot.
"""

from __future__ import annotations

import importlib
import json
from functools import partial
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
    _infer_tool_parser,
    _is_bpe_decoder,
    _is_spm_decoder,
    _is_spm_decoder_no_space,
)
from mlx_lm.utils import _tokenizer_defaults
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from semantic_server.models.gguf_import import MANIFEST

# Everything the importer writes into tokenizer_config.json. A folder whose config holds
# anything else (a chat_template_type, an auto_map, ...) goes through mlx-lm.
IMPORTED_KEYS = frozenset({"tokenizer_class", "bos_token", "eos_token", "unk_token",
                           "pad_token", "add_bos_token", "add_eos_token", "model_max_length",
                           "chat_template"})
# Files AutoTokenizer would read besides those two: where one exists, mlx-lm loads it.
OTHER_FILES = ("chat_template.jinja", "chat_template.json", "special_tokens_map.json",
               "added_tokens.json", "tokenizer.model")


class PrebuiltTokenizer(PreTrainedTokenizerFast):
    """transformers' generic fast tokenizer around a Rust tokenizer built already.

    transformers builds its own from tokenizer.json, or deep-copies a given one (a JSON
    round trip, as slow as the build). Its ``get_vocab`` reads the whole vocabulary out of
    Rust on every call, and ``convert_ids_to_tokens`` asks Rust once per id. This one keeps
    the given backend and reads the vocabulary once (again only when tokens were added
    since); a list of ids is converted through it."""

    def __init__(self, backend: Tokenizer, **kwargs: Any) -> None:
        self._tokenizer = backend  # transformers keeps a backend set before its __init__
        self._vocab: dict[str, int] = {}
        self._tokens: list[str | None] = []
        super().__init__(**kwargs)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._read_vocab())

    def _read_vocab(self) -> dict[str, int]:
        if len(self._vocab) != len(self):
            self._vocab = super().get_vocab()
            tokens: list[str | None] = [None] * len(self._vocab)
            for token, index in self._vocab.items():
                if index < len(tokens):
                    tokens[index] = token
            # Each id's token, when every id below the size has exactly one: then Rust's
            # id_to_token answers the same for each.
            self._tokens = [] if None in tokens else tokens
        return self._vocab

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False,
                              ) -> str | list[str]:
        if isinstance(ids, int) or skip_special_tokens:
            return super().convert_ids_to_tokens(ids, skip_special_tokens)
        self._read_vocab()
        indices = [int(index) for index in ids]
        if self._tokens and all(0 <= index < len(self._tokens) for index in indices):
            return [self._tokens[index] for index in indices]
        return super().convert_ids_to_tokens(indices)


def imported_config(path: Path) -> dict[str, Any] | None:
    """The tokenizer config of a folder the importer wrote, or None for any other."""
    if not (path / MANIFEST).is_file() or not (path / "tokenizer.json").is_file() \
            or any((path / name).exists() for name in OTHER_FILES):
        return None
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") != "PreTrainedTokenizerFast" or set(config) - IMPORTED_KEYS:
        return None
    return config


def _detokenizer_class(backend: Tokenizer) -> Any:
    """mlx-lm's choice of streaming detokenizer, made on the backend's decoder instead of
    on a parse of the whole tokenizer.json."""
    if backend.decoder is None:
        return NaiveStreamingDetokenizer
    decoder = json.loads(backend.decoder.__getstate__())
    if _is_spm_decoder(decoder):
        return SPMStreamingDetokenizer
    if _is_spm_decoder_no_space(decoder):
        return partial(SPMStreamingDetokenizer, trim_space=False)
    if _is_bpe_decoder(decoder):
        return BPEStreamingDetokenizer
    return NaiveStreamingDetokenizer


def _build(path: Path, config: dict[str, Any], eos_token_ids: list[int] | None,
           ) -> TokenizerWrapper:
    """What ``AutoTokenizer.from_pretrained`` and mlx-lm's ``load`` make of ``path``."""
    backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    added = {str(token): token for token in backend.get_added_tokens_decoder().values()}
    kwargs = {key: value for key, value in config.items()
              # transformers drops the BOS/EOS flags when a tokenizer.json exists: its
              # post-processor decides (the importer writes BOS into it)
              if key not in ("tokenizer_class", "add_bos_token", "add_eos_token")}
    for key in PreTrainedTokenizerFast.SPECIAL_TOKENS_ATTRIBUTES:
        if kwargs.get(key) is not None:  # as from_pretrained: the added token's own flags
            kwargs[key] = added.get(str(kwargs[key]), kwargs[key])
    # is_local as from_pretrained has it: else transformers asks the hub about the name
    tokenizer = PrebuiltTokenizer(backend, name_or_path=str(path), is_local=True,
                                  local_files_only=False, **kwargs)
    parser = _infer_tool_parser(tokenizer)
    tools = importlib.import_module(f"mlx_lm.tool_parsers.{parser}") if parser else None
    return TokenizerWrapper(
        tokenizer, _detokenizer_class(backend), eos_token_ids=eos_token_ids,
        tool_parser=tools.parse_tool_call if tools else None,
        tool_call_start=tools.tool_call_start if tools else None,
        tool_call_end=tools.tool_call_end if tools else None)


def load_tokenizer(path: Path, eos_token_ids: int | list[int] | None = None,
                   ) -> TokenizerWrapper:
    """``mlx_lm.utils.load_tokenizer(path, eos_token_ids=...)``: the same tokenizer, built
    without the slow Python around the Rust build for an imported model."""
    config = imported_config(path)
    if config is None or _tokenizer_defaults(path):  # an architecture's own template, parser
        return mlx_load_tokenizer(path, eos_token_ids=eos_token_ids)
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else eos_token_ids
    return _build(path, config, ids)
