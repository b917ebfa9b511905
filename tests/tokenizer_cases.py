"""What two tokenizers must agree on to be the same tokenizer for the server: ids, text,
streaming text and chat template, on strings with special tokens, unicode and runs of
whitespace. Shared by the fast tier's tiny tokenizers and the real models' test."""

from __future__ import annotations

from typing import Any

TEXTS = ["Hello", "the cat sat on the mat", "  two leading spaces", "trailing   ",
         "runs    of     spaces", "tabs\tand\nnewlines\n\n\nhere", "naïve café — 日本語 🤖",
         "<bos>inline<eos> specials", "<start_of_turn>user\nhi<end_of_turn>",
         "<|im_start|>user\nhello world<|im_end|>", "", " ", "\u00a0\u2009", "a\r\nb",
         "ℌ𝔢𝔩𝔩𝔬 \U0001f600\U0001f600"]
MESSAGES = [{"role": "system", "content": "Be  brief."},
            {"role": "user", "content": "hello world\n\n日本語 🤖"},
            {"role": "assistant", "content": "  the cat sat  "},
            {"role": "user", "content": "<bos>and then?"}]


def streamed(tokenizer: Any, ids: list[int]) -> list[str]:
    """The segments a streaming detokenizer gives, one token at a time, then finalized."""
    detokenizer = tokenizer.detokenizer
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    return [*segments, detokenizer.last_segment]


def assert_same_tokenizer(ours: Any, theirs: Any, texts: list[str]) -> None:
    """``ours`` and ``theirs`` (mlx-lm TokenizerWrappers) behave the same on ``texts``."""
    assert type(ours._detokenizer) is type(theirs._detokenizer)
    assert ours.eos_token_ids == theirs.eos_token_ids
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.added_tokens_decoder == theirs.added_tokens_decoder
    assert (ours.has_thinking, ours.tool_parser, ours.has_chat_template) \
        == (theirs.has_thinking, theirs.tool_parser, theirs.has_chat_template)
    assert ours.get_vocab() == theirs.get_vocab() and len(ours) == len(theirs)
    every = list(range(len(theirs)))
    assert ours.convert_ids_to_tokens(every) == theirs.convert_ids_to_tokens(every)
    assert ours._detokenizer.tokenmap == theirs._detokenizer.tokenmap
    for text in texts:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            assert ours.decode(ids) == theirs.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) \
                == theirs.decode(ids, skip_special_tokens=True)
            assert streamed(ours, ids) == streamed(theirs, ids), text
    for prompt in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt) \
            == theirs.apply_chat_template(MESSAGES, add_generation_prompt=prompt)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=prompt, tokenize=False) \
            == theirs.apply_chat_template(MESSAGES, add_generation_prompt=prompt,
                                          tokenize=False)
