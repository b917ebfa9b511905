"""The tokenizer of an imported model, built around one Rust build (models/tokenizer.py),
against mlx-lm's ``load_tokenizer`` of the same folder.

The folders are tiny, in the two shapes the GGUF importer writes: Gemma's (SentencePiece
BPE with byte fallback, BOS in the post-processor, a transcript template) and SmolLM2's
(byte-level BPE, a ChatML template), with special and added tokens. Both loaders must give
the same ids, text, streaming text and chat template; ours must not parse tokenizer.json
in Python, build it in Rust once and read the vocabulary once; the registry loads an
imported model with it. The real models are compared in
tests/integration/test_tokenizer_real.py.
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semantic_server.models import tokenizer as fast
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.gguf_import import IMPORTER_VERSION, MANIFEST
from semantic_server.models.registry import ModelRegistry
from tests.conftest import ROOT
from tests.tokenizer_cases import TEXTS, assert_same_tokenizer

SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_WORDS = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁hello", "▁world", "hello", "▁▁",
             "▁▁▁▁", "\n\n", "▁日本"]
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_WORDS = ["Ġthe", "Ġcat", "Ġsat", "hello", "Ġhello", "Ġworld", "ĠĠ", "ĠĠĠĠ", "ĊĊ"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _merged(words: list[str]) -> tuple[list[str], list[list[str]]]:
    """Tokens and BPE merges that build each word left to right from its characters."""
    tokens: list[str] = []
    merges: list[list[str]] = []
    for word in words:
        tokens += [c for c in dict.fromkeys(word) if c not in tokens]
        built = word[0]
        for char in word[1:]:
            if [built, char] not in merges:
                merges.append([built, char])
            built += char
            if built not in tokens:
                tokens.append(built)
    return tokens, merges


def _added(vocab: list[str], specials: list[str], plain: tuple[str, ...] = ()) -> list[dict]:
    return [{"id": vocab.index(t), "content": t, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": t in specials}
            for t in [*specials, *plain]]


def _spm(vocab_words: list[str]) -> tuple[dict, dict]:
    """Gemma's shape."""
    pieces, merges = _merged(vocab_words)
    vocab = SPM_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + pieces
    bos = {"SpecialToken": {"id": "<bos>", "type_id": 0}}
    spec = {
        "added_tokens": _added(vocab, SPM_SPECIALS, ("\n\n",)),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                          "behavior": "MergedWithPrevious", "invert": False},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges}}
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
              "pad_token": "<pad>", "add_bos_token": True,
              "chat_template": (ROOT / "scripts/templates/transcript.jinja").read_text()}
    return spec, config


def _byte_level(vocab_words: list[str]) -> tuple[dict, dict]:
    """SmolLM2's shape."""
    pieces, merges = _merged(vocab_words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = BYTE_SPECIALS + alphabet + [p for p in pieces if p not in alphabet]
    level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec = {
        "added_tokens": _added(vocab, BYTE_SPECIALS),
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **level},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {}},
        "decoder": {"type": "ByteLevel", **level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges}}
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_bos_token": False,
              "chat_template": CHATML}
    return spec, config


SHAPES = {"spm": (_spm, SPM_WORDS, "gemma3_text"), "byte-level": (_byte_level, BYTE_WORDS,
                                                                   "llama")}


def write_imported(folder: Path, shape: str, model_config: dict | None = None) -> Path:
    """A model folder as the importer writes it, tokenizer files and manifest (no weights
    unless the caller writes them)."""
    build, words, model_type = SHAPES[shape]
    spec, config = build(words)
    folder.mkdir(parents=True)
    spec = {"version": "1.0", "truncation": None, "padding": None, **spec}
    (folder / "tokenizer.json").write_text(Tokenizer.from_str(json.dumps(spec)).to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **config, "add_eos_token": False,
        "model_max_length": 2048}))
    (folder / "config.json").write_text(json.dumps(model_config or {"model_type": model_type}))
    (folder / MANIFEST).write_text(json.dumps({"importer_version": IMPORTER_VERSION}))
    return folder


@pytest.fixture(params=sorted(SHAPES))
def folder(request, tmp_path) -> Path:
    return write_imported(tmp_path / request.param, request.param)


def test_same_ids_text_and_template_as_mlx_lm(folder):
    ours, theirs = fast.load_tokenizer(folder), mlx_load_tokenizer(folder)
    assert isinstance(ours._tokenizer, fast.PrebuiltTokenizer)
    assert_same_tokenizer(ours, theirs, TEXTS)


def test_eos_ids_as_mlx_lm_takes_them(folder):
    for eos in (5, [5, 1], None):
        assert fast.load_tokenizer(folder, eos).eos_token_ids \
            == mlx_load_tokenizer(folder, eos_token_ids=eos).eos_token_ids


def test_tokenizer_json_is_built_once_in_rust_and_never_parsed_in_python(folder, monkeypatch):
    """What made Gemma's tokenizer slow, counted: Python parsed its tokenizer.json twice,
    and the vocabulary was read out of Rust three times."""
    opened, built, read = [], [], []
    real_open, real_from_file = builtins.open, Tokenizer.from_file
    real_get_vocab = PreTrainedTokenizerFast.get_vocab

    def spy_open(file, *args, **kwargs):
        opened.append(Path(os.fsdecode(file)).name if isinstance(file, str | os.PathLike)
                      else file)
        return real_open(file, *args, **kwargs)

    class CountingTokenizer:
        @staticmethod
        def from_file(path: str) -> Tokenizer:
            built.append(Path(path).name)
            return real_from_file(path)

    def counting_get_vocab(self):
        read.append(1)
        return real_get_vocab(self)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(fast, "Tokenizer", CountingTokenizer)
    monkeypatch.setattr(PreTrainedTokenizerFast, "get_vocab", counting_get_vocab)
    tokenizer = fast.load_tokenizer(folder)
    assert "tokenizer.json" not in opened
    assert built == ["tokenizer.json"]
    assert len(read) == 1
    tokenizer.get_vocab()
    tokenizer.convert_ids_to_tokens([0, 1, 2])
    assert len(read) == 1, "the vocabulary is read again only when tokens were added"
    tokenizer.add_tokens(["<added-later>"])
    assert tokenizer.get_vocab()["<added-later>"] == len(tokenizer) - 1
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) - 1]) == ["<added-later>"]


def test_other_folders_go_through_mlx_lm(tmp_path):
    def changed(name: str, edit) -> Path:
        folder = write_imported(tmp_path / name, "byte-level")
        edit(folder)
        return folder

    def config_with(**more):
        def edit(folder: Path) -> None:
            path = folder / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **more}))
        return edit

    plain = write_imported(tmp_path / "plain", "byte-level")
    assert fast.imported_config(plain) is not None
    others = [changed("not-imported", lambda f: (f / MANIFEST).unlink()),
              changed("jinja", lambda f: (f / "chat_template.jinja").write_text("{{ 1 }}")),
              changed("own-class", config_with(tokenizer_class="LlamaTokenizer")),
              changed("more-keys", config_with(tool_parser_type="json_tools"))]
    for folder in others:
        assert fast.imported_config(folder) is None, folder.name
        assert not isinstance(fast.load_tokenizer(folder)._tokenizer, fast.PrebuiltTokenizer)


def tiny_model(root: Path) -> Path:
    """A two-layer llama with random weights under the byte-level tokenizer."""
    args = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "vocab_size": 512, "tie_word_embeddings": True}
    folder = write_imported(root / "tiny", "byte-level", args)
    model = llama.Model(llama.ModelArgs.from_dict(args))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def test_the_registry_loads_an_imported_model_with_it_once_per_files_version(tmp_path):
    folder = tiny_model(tmp_path)
    registry = ModelRegistry(ModelCatalog(tmp_path))
    first, second = registry.load("tiny"), registry.load("tiny")
    assert isinstance(first.tokenizer._tokenizer, fast.PrebuiltTokenizer)
    assert first.tokenizer is second.tokenizer
    tokens = folder / "tokenizer.json"
    os.utime(tokens, ns=(tokens.stat().st_atime_ns, tokens.stat().st_mtime_ns + 10**9))
    assert registry.load("tiny").tokenizer is not first.tokenizer
    for loaded in list(registry.resident):
        registry.unload(loaded)
