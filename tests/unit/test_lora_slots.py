"""Prepared LoRA layers, adapter slots and per-row routing, on a tiny real llama (two layers
of 32 features, random weights: milliseconds) run by mlx-lm's real BatchGenerator. What a
trained adapter does to SmolLM2 is the real tier's (tests/e2e/test_lora_adapters.py); here
it is the arithmetic and the bookkeeping: a slot equals mlx-lm's own LoRA layer, a smaller
rank is zero-filled, each row of a mixed batch gets exactly what it gets alone, and a slot
in use is never overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear

from semantic_server.engine.adapter_rows import RoutedModel, with_row, without_row
from semantic_server.engine.adapter_slots import NO_ADAPTER, AdapterSlots
from semantic_server.errors import AdapterIncompatible, AdapterInvalid, AdapterSlotsBusy
from semantic_server.models.adapters import read_adapter
from semantic_server.models.lora import SlotRouting, SlottedLoRALinear, prepare_lora

BASE = "tiny-llama"
HIDDEN = 32
KV_OUT = 16  # 2 KV heads of 8


def tiny_llama() -> llama.Model:
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(
        model_type="llama", hidden_size=HIDDEN, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=64,
        tie_word_embeddings=True))
    mx.eval(model.parameters())
    return model


def write_adapter(root: Path, name: str, rank: int, seed: int, base: str = BASE,
                  layers: tuple[int, ...] = (0, 1), kind: str = "lora") -> Path:
    """A LoRA adapter for the tiny llama in mlx-lm's format, with random weights."""
    mx.random.seed(seed)
    weights = {}
    for layer in layers:
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            name_ = f"model.layers.{layer}.self_attn.{proj}"
            weights[f"{name_}.lora_a"] = mx.random.normal((HIDDEN, rank)) * 0.5
            weights[f"{name_}.lora_b"] = mx.random.normal((rank, out)) * 0.5
    folder = root / name
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": kind, "num_layers": len(layers), "semantic_base": {"model_id": base},
        "lora_parameters": {"rank": rank, "scale": 2.0, "dropout": 0.0}}))
    return folder


@pytest.fixture
def adapters(tmp_path):
    return {name: read_adapter(write_adapter(tmp_path, name, rank, seed))
            for name, rank, seed in (("one", 4, 1), ("two", 2, 2), ("three", 4, 3))}


def mlx_lm_reference(adapter, prompt: list[int], tokens: int) -> list[int]:
    """Greedy tokens of the tiny llama with the adapter applied by mlx-lm's LoRALinear."""
    model = tiny_llama()
    weights = mx.load(str(adapter.path / "adapters.safetensors"))
    named = dict(model.named_modules())
    for module in adapter.modules:
        layer = LoRALinear.from_base(named[module], r=adapter.rank, scale=adapter.scale)
        layer.lora_a, layer.lora_b = weights[f"{module}.lora_a"], weights[f"{module}.lora_b"]
        model.update_modules(tree_unflatten([(module, layer)]))
    return greedy(model, prompt, tokens)


def greedy(model, prompt: list[int], tokens: int) -> list[int]:
    cache = model.make_cache()
    inputs, out = mx.array([prompt]), []
    for _ in range(tokens):
        token = int(mx.argmax(model(inputs, cache=cache)[0, -1]).item())
        out.append(token)
        inputs = mx.array([[token]])
    return out


def generate_batch(lora_model, lora, slots: AdapterSlots, jobs: list[tuple[list[int], object]],
                   tokens: int) -> list[list[int]]:
    """Run ``jobs`` (prompt, adapter) together through mlx-lm's BatchGenerator, routed."""
    generator = BatchGenerator(RoutedModel(lora_model, lora), completion_batch_size=8,
                               prefill_batch_size=8)
    taken = [slots.take(adapter) for _, adapter in jobs]
    uids = generator.insert([prompt for prompt, _ in jobs], max_tokens=[tokens] * len(jobs),
                            caches=[with_row(lora_model.make_cache(), slot) for slot in taken])
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    finished = 0
    while finished < len(jobs):
        _, responses = generator.next()
        for response in responses:
            out[response.uid].append(response.token)
            if response.finish_reason is not None:
                finished += 1
                assert len(without_row(response.prompt_cache)) == 2  # the two KV layers
    generator.close()
    for slot in taken:
        slots.give_back(slot)
    return [out[uid] for uid in uids]


def test_a_slot_computes_what_mlx_lms_lora_layer_computes():
    routing = SlotRouting()
    linear = nn.Linear(HIDDEN, KV_OUT, bias=False)
    slotted = SlottedLoRALinear(linear, slots=3, rank=4, routing=routing)
    refs = []
    for slot, rank in ((1, 4), (2, 2)):  # rank 2 is zero-filled up to the prepared 4
        ref = LoRALinear.from_base(linear, r=rank, scale=3.0)
        ref.lora_b = mx.random.normal((rank, KV_OUT))
        slotted.write(slot, ref.lora_a, ref.lora_b, 3.0)
        refs.append(ref)
    x = mx.random.normal((3, 5, HIDDEN))
    routing.use([1, 2, NO_ADAPTER])  # one row each
    y = slotted(x)
    assert mx.allclose(y[0], refs[0](x[:1])[0], atol=1e-5)
    assert mx.allclose(y[1], refs[1](x[1:2])[0], atol=1e-5)
    assert mx.array_equal(y[2], linear(x)[2])  # slot 0 adds exact zeros
    routing.use([2, 2, 2])  # one slot for the batch
    assert mx.allclose(slotted(x), refs[1](x), atol=1e-5)
    routing.use([0, 0, 0])  # no adapter: the base layer, exactly
    assert mx.array_equal(slotted(x), linear(x))


def test_a_mixed_batch_gives_each_row_what_it_gets_alone(adapters):
    model = tiny_llama()
    lora = prepare_lora(model, list(adapters.values()), BASE, slots=4)
    assert lora is not None and lora.rank == 4 and len(lora.layers) == 4
    slots = AdapterSlots(lora.slots, lora.write)
    prompt = [3, 14, 15, 9, 26]
    alone = [generate_batch(model, lora, slots, [(prompt, a)], 8)[0]
             for a in (None, adapters["one"], adapters["two"])]
    assert alone[0] == greedy(tiny_llama(), prompt, 8)  # no adapter: the base model's tokens
    assert alone[1] == mlx_lm_reference(adapters["one"], prompt, 8)
    assert alone[2] == mlx_lm_reference(adapters["two"], prompt, 8)  # rank 2, zero-filled
    assert len({tuple(a) for a in alone}) == 3  # the adapters change the output
    mixed = generate_batch(model, lora, slots, [
        (prompt, None), (prompt, adapters["one"]), (prompt, adapters["two"]),
        (prompt, adapters["one"])], 8)
    assert mixed == [alone[0], alone[1], alone[2], alone[1]]


def test_a_slot_in_use_is_never_overwritten(adapters):
    written: list[tuple[int, str]] = []
    slots = AdapterSlots(3, lambda slot, adapter: written.append((slot, adapter.name)))
    one = slots.take(adapters["one"])
    two = slots.take(adapters["two"])
    assert {one, two} == {1, 2} and slots.take(None) == NO_ADAPTER
    assert not slots.can_take(adapters["three"])  # both slots run requests
    with pytest.raises(AdapterSlotsBusy):
        slots.load(adapters["three"])
    assert slots.take(adapters["one"]) == one and slots.loads == 2  # resident: no copy
    slots.give_back(two)
    assert slots.can_take(adapters["three"])
    assert slots.load(adapters["three"]).slot == two  # the free slot, not the busy one
    assert slots.resident() == {adapters["one"].key: one, adapters["three"].key: two}
    assert written == [(one, "one"), (two, "two"), (two, "three")]


def test_incompatible_adapters_are_refused_naming_why(tmp_path, adapters):
    model = tiny_llama()
    lora = prepare_lora(model, [adapters["two"]], BASE, slots=2)  # rank 2, layers 0 and 1
    assert lora is not None and lora.rank == 2
    cases = {
        "other-base": (write_adapter(tmp_path, "other-base", 2, 5, base="gemma"),
                       "trained on 'gemma'"),
        "bigger": (write_adapter(tmp_path, "bigger", 8, 6), "rank 8 is larger"),
        "dora": (write_adapter(tmp_path, "dora", 2, 7, kind="dora"), "it is dora"),
    }
    for folder, reason in cases.values():
        with pytest.raises(AdapterIncompatible, match=reason):
            lora.check(read_adapter(folder), BASE)
    assert prepare_lora(tiny_llama(), [adapters["one"]], BASE, slots=2, max_rank=0) is None
    assert prepare_lora(tiny_llama(), [adapters["one"]], "another-model", slots=2) is None
    wider = prepare_lora(tiny_llama(), [adapters["two"]], BASE, slots=2, max_rank=8)
    assert wider is not None and wider.incompatibility(
        read_adapter(cases["bigger"][0]), BASE) is None


def test_modules_it_was_not_prepared_for_are_refused(tmp_path):
    model = tiny_llama()
    only_first = read_adapter(write_adapter(tmp_path, "first", 2, 1, layers=(0,)))
    both = read_adapter(write_adapter(tmp_path, "both", 2, 2, layers=(0, 1)))
    lora = prepare_lora(model, [only_first], BASE, slots=2)
    assert lora is not None
    with pytest.raises(AdapterIncompatible, match=r"model\.layers\.1\..* not prepared"):
        lora.check(both, BASE)


def test_files_changed_or_damaged_after_the_check_are_refused(tmp_path, adapters):
    """A slot is filled from disk when it is needed, maybe long after the adapter was
    checked: other weights under the same name would run under the old fingerprint (and
    its caches), so they are refused, as are files that cannot be read."""
    lora = prepare_lora(tiny_llama(), list(adapters.values()), BASE, slots=2)
    assert lora is not None
    one = adapters["one"]
    weights = one.path / "adapters.safetensors"
    mx.save_safetensors(str(weights), {k: v * 2 for k, v in mx.load(str(weights)).items()})
    with pytest.raises(AdapterInvalid, match="changed on disk"):
        lora.write(1, one)
    two = adapters["two"]
    path = two.path / "adapters.safetensors"
    path.write_bytes(path.read_bytes()[:-64])  # truncated: the header still reads
    with pytest.raises(AdapterInvalid):
        lora.write(1, read_adapter(two.path))
