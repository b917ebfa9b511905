"""Fakes for the fast tier: models that compute nothing, so the server's own logic (gate,
engine, caches, swaps, routes) runs in milliseconds.

What is fake is only what needs a real model: ``FakeRegistry`` loads ``FakeModel``s (whose
loads succeed, fail, give NaN or hang on request, and count their loads and unloads, as
llama-swap's router tests do with ``newFakeProcess``), and ``FakeGenerator`` stands in for
mlx-lm's BatchGenerator: it "prefills" and "decodes" by writing each token's id into real
mlx-lm KV caches, so the store, the pool and the cache files see real arrays whose
contents say which tokens they hold. Everything else is the real server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Generator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from semantic_server.config import Settings
from semantic_server.engine.service import Admitted, GenerationParams, GenerationService
from semantic_server.errors import ModelLoadError
from semantic_server.models.catalog import ModelCatalog
from semantic_server.models.dims import LayerCache, LayerKind, ModelDims
from semantic_server.models.registry import (
    LoadedModel,
    LoadStats,
    MemorySnapshot,
    Prepared,
    UnloadStats,
    run_slices,
)
from semantic_server.models.tag import ModelTag
from semantic_server.request_outcome import Outcome

EOS = 0
FAST_ADMIN_KEY = "fast-key"  # the admin key of the fast tier's HTTP servers
WEIGHT_BYTES = 2**20  # what a fake model's weights count for in the memory budget
HEAD_DIM = 8
CONFIG = {"num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
          "hidden_size": HEAD_DIM, "max_position_embeddings": 4096, "vocab_size": 0x110000}
DIMS = ModelDims(2, 1, HEAD_DIM, "float32", (LayerCache(LayerKind.GLOBAL),) * 2)


def sliding_dims(window: int) -> ModelDims:
    """A global layer and a sliding-window layer of ``window`` tokens (like Gemma 3)."""
    return ModelDims(2, 1, HEAD_DIM, "float32",
                     (LayerCache(LayerKind.GLOBAL), LayerCache(LayerKind.SLIDING, window)))


class FakeDetokenizer:
    def __init__(self) -> None:
        self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.last_segment = chr(token)

    def finalize(self) -> None:
        self.last_segment = ""


class FakeTokenizer:
    """One token per character (its code point); a chat template of ``role: text`` lines."""

    eos_token_ids = frozenset({EOS})

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    @property
    def detokenizer(self) -> FakeDetokenizer:
        return FakeDetokenizer()


@dataclass
class FakeModel:
    """How a fake model behaves: what it answers, and how its load goes.

    ``load``: "ok", "fail" (a ModelLoadError) or "nan" (a warm-up with NaN logits).
    ``load_gate``: when set, a load waits until the event is set (a load that hangs).
    ``step_gate``: when set, decoding waits for it (requests stay in flight on purpose).
    ``step_fault``: raised by the next decoding step (a fault injected into the engine).
    ``window``: its second layer slides over this many tokens (its cache can wrap).
    ``unhealthy``: it loads, but its health check fails.
    """

    reply: str = "Hello!"
    load: str = "ok"
    load_gate: threading.Event | None = None
    step_gate: threading.Event | None = None
    step_fault: BaseException | None = None
    window: int | None = None
    weight_bytes: int = WEIGHT_BYTES  # what the memory budget counts for it, once loaded
    unhealthy: bool = False  # loads, but fails the dual path's health check
    loads: int = 0
    unloads: int = 0

    @property
    def dims(self) -> ModelDims:
        return sliding_dims(self.window) if self.window else DIMS

    def make_cache(self) -> list[Any]:
        if self.window:
            return [KVCache(), RotatingKVCache(max_size=self.window)]
        return [KVCache() for _ in range(DIMS.n_layers)]


class FakeRegistry:
    """ModelRegistry's interface over ``FakeModel``s; the catalog is real (tiny folders)."""

    compute_dtype = None

    def __init__(self, catalog: ModelCatalog, models: dict[str, FakeModel]) -> None:
        self.catalog = catalog
        self.models = models
        self.resident: list[LoadedModel] = []

    def kv_dtype_name(self, config: dict[str, Any]) -> str:
        return "float32"

    def lora_bytes(self, model_id: str) -> int:
        return 0  # fake models have no adapter layers

    def prepare(self, model_id: str) -> Prepared:
        return Prepared(model_id, self.catalog.resolve(model_id), dict(CONFIG), FakeTokenizer())

    def load(self, model_id: str) -> LoadedModel:
        return run_slices(self.load_slices(self.prepare(model_id)))

    def load_slices(self, prepared: Prepared) -> Generator[None, None, LoadedModel]:
        """A load that waits (slice by slice, never blocking the engine) for its gate."""
        spec = self.models[prepared.model_id]
        spec.loads += 1
        while spec.load_gate is not None and not spec.load_gate.wait(timeout=0.001):
            yield
        if spec.load == "fail":
            raise ModelLoadError(f"could not load {prepared.model_id!r}: broken on purpose")
        if spec.load == "nan":
            raise ModelLoadError("warm-up produced non-finite logits")
        snapshot = MemorySnapshot(0, 0, 0)
        loaded = LoadedModel(prepared.model_id, prepared.path, spec, prepared.tokenizer,
                             prepared.config,
                             ModelTag(prepared.model_id, f"fp-{prepared.model_id}", spec.dims),
                             LoadStats(0.0, snapshot, snapshot), spec.weight_bytes)
        self.resident.append(loaded)
        return loaded

    def health_check(self, loaded: LoadedModel) -> Generator[None, None, None]:
        yield
        if loaded.model.unhealthy:
            raise ModelLoadError("the health check produced non-finite logits")

    def unload(self, loaded: LoadedModel) -> UnloadStats:
        self.resident.remove(loaded)
        self.models[loaded.model_id].unloads += 1
        snapshot = MemorySnapshot(0, 0, 0)
        return UnloadStats(loaded.model_id, 0.0, snapshot, snapshot)


def write_model_dirs(root: Path, model_ids: list[str]) -> Path:
    """Folders the real catalog lists: a config.json and a weights file each (of
    ``WEIGHT_BYTES`` zeros, which the swap's preflight weighs against the memory budget)."""
    for model_id in model_ids:
        folder = root / model_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(CONFIG))
        with (folder / "model.safetensors").open("wb") as weights:
            weights.truncate(WEIGHT_BYTES)  # sparse: sized for the memory budget, no data
    return root


def block_cache_writes(cache_dir: Path, tag_digest: str) -> Path:
    """Make every cache write of a tag fail for real (an OSError): a plain file stands
    where the tag's folder should be. Returns it, for the test to remove."""
    blocker = cache_dir / tag_digest
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the folder should be: every write fails")
    return blocker


def append_tokens(layers: list[Any], tokens: list[int]) -> None:
    """Grow each layer's cache by ``tokens``; every key and value holds its token's id."""
    if not tokens:
        return
    values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    values = values * mx.ones((1, 1, len(tokens), HEAD_DIM))
    for layer in layers:
        layer.update_and_fetch(values, values)


def cached_token_ids(layers: list[Any]) -> list[int]:
    """The token ids a fake cache holds (what ``append_tokens`` wrote), from its arrays."""
    keys = layers[0].state[0]
    return [int(v) for v in keys[0, 0, : layers[0].offset, 0].tolist()]


@dataclass
class _Sequence:
    uid: int
    prompt: list[int]
    max_tokens: int
    cache: list[Any]
    tokens: list[int]  # every token the cache holds (all_tokens)
    generated: int = 0
    prefilled: bool = False


@dataclass
class FakePromptResponse:
    uid: int
    end_of_segment: bool
    end_of_prompt: bool


@dataclass
class FakeResponse:
    uid: int
    token: int
    finish_reason: str | None
    prompt_cache: list[Any] | None = None
    all_tokens: list[int] | None = None


@dataclass
class FakeGenerator:
    """BatchGenerator's interface: each ``next()`` prefills every new sequence and emits one
    token of the model's reply for each running one, then EOS (or stops at max_tokens)."""

    model: FakeModel
    sequences: dict[int, _Sequence] = field(default_factory=dict)
    next_uid: int = 0
    closed: bool = False

    @classmethod
    def factory(cls, loaded: LoadedModel, max_batch: int, prefill_step_size: int,
                ) -> FakeGenerator:
        return cls(loaded.model)

    def insert(self, prompts: list[list[int]], max_tokens: list[int], caches: list[Any],
               all_tokens: list[list[int]], samplers: list[Any],
               logits_processors: list[list[Any]] | None = None) -> list[int]:
        uids = []
        for prompt, limit, cache, tokens in zip(prompts, max_tokens, caches, all_tokens,
                                                strict=True):
            if not prompt:
                raise ValueError("empty prompt")
            uid, self.next_uid = self.next_uid, self.next_uid + 1
            layers = cache if cache is not None else self.model.make_cache()
            self.sequences[uid] = _Sequence(uid, list(prompt), limit, layers, list(tokens))
            uids.append(uid)
        return uids

    def remove(self, uids: list[int], return_prompt_caches: bool = False,
               ) -> dict[int, tuple[list[Any], list[int]]]:
        removed = {uid: self.sequences.pop(uid) for uid in uids if uid in self.sequences}
        return {uid: (s.cache, s.tokens) for uid, s in removed.items()}

    def next(self) -> tuple[list[Any], list[FakeResponse]]:
        if self.model.step_fault is not None:
            raise self.model.step_fault
        gate = self.model.step_gate
        if gate is not None and not gate.wait(timeout=0.01):
            return [], []  # held on purpose: the engine tries again (a wait, not a spin)
        prompt_responses, responses = [], []
        for seq in list(self.sequences.values()):
            if not seq.prefilled and len(seq.prompt) > 1:  # the first segment: all but one
                append_tokens(seq.cache, seq.prompt[:-1])
                seq.tokens += seq.prompt[:-1]
                seq.prompt = seq.prompt[-1:]
                prompt_responses.append(FakePromptResponse(seq.uid, True, False))
                continue
            if not seq.prefilled:
                append_tokens(seq.cache, seq.prompt)
                seq.tokens += seq.prompt
                seq.prefilled = True
            reply = self.model.reply
            token = ord(reply[seq.generated]) if seq.generated < len(reply) else EOS
            seq.generated += 1
            finish = ("stop" if token == EOS else
                      "length" if seq.generated >= seq.max_tokens else None)
            if finish is None or finish == "length":
                append_tokens(seq.cache, [token])  # the sampled token enters the cache
                seq.tokens.append(token)
            if finish is None:
                responses.append(FakeResponse(seq.uid, token, None))
                continue
            del self.sequences[seq.uid]
            responses.append(FakeResponse(seq.uid, token, finish, seq.cache, seq.tokens))
        return prompt_responses, responses

    def extract_cache(self, uids: list[int]) -> dict[int, tuple[list[Any], list[int]]]:
        """Copies of the sequences' caches, as mlx-lm's (contiguous copies) are."""
        return {uid: ([type(layer).from_state(tuple(
            mx.array(item) if isinstance(item, mx.array) else item for item in layer.state))
            for layer in self.sequences[uid].cache], list(self.sequences[uid].tokens))
            for uid in uids}

    def close(self) -> None:
        self.closed = True


def fake_settings(root: Path, model: str = "fake-a", **overrides: Any) -> Settings:
    """Settings of an in-process server over fake models under ``root``."""
    return Settings(model=model, models_dir=root / "models", cache_dir=root / "caches",
                    adapters_dir=overrides.pop("adapters_dir", root / "adapters"),
                    kv_budget_bytes=overrides.pop("kv_budget_bytes", 2**20),
                    cache_disk_bytes=overrides.pop("cache_disk_bytes", 2**30),
                    swap_hold_seconds=overrides.pop("swap_hold_seconds", 5.0), **overrides)


@dataclass
class TurnResult:
    admitted: Admitted
    text: str
    outcome: Outcome


async def run_turn(service: GenerationService, agent: str | None, content: str,
                   max_tokens: int = 64, model: str | None = None,
                   history: list[dict[str, str]] | None = None,
                   stop: tuple[str, ...] = (), keep_alive: float | None = None,
                   ) -> TurnResult:
    """One whole turn through the real service: the user's ``content`` after ``history``."""
    messages = [*(history or []), {"role": "user", "content": content}]
    params = GenerationParams(max_tokens=max_tokens, stop=stop, keep_alive=keep_alive)
    async with aclosing(service.generate(agent, messages, params, model)) as items:
        first = await anext(items)
        assert isinstance(first, Admitted), first
        text = []
        async for item in items:
            if isinstance(item, Outcome):
                return TurnResult(first, "".join(text), item)
            text.append(item)
    raise AssertionError("the generation ended without an outcome")

