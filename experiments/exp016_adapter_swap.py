"""EXP-016: an adapter swapped in place against a full reload of the same base, and the
decode throughput of a batch mixing two adapters against a batch of one, in one run.

In-process servers on SmolLM2 with the two trained test adapters (``capitals`` and
``signature``, from ``scripts/train_adapters``). The first has two LoRA slots (slot 0 is
"no adapter"), so every swap between the two adapters copies the new adapter's weights
into the prepared layers (the worst case; with more slots a swap back to a resident
adapter copies nothing); the second has three, so both adapters run in one batch.

1. **Swap time**: N reloads of SmolLM2 by the zero-downtime model swap (dual path: load,
   warm, promote, retire, unload; the whole swap and its load step alone), then N adapter
   swaps alternating the two adapters (check, copy, switch). Target: the adapter swap
   under 5% of the reload.
2. **Mixed batch**: B concurrent plain-text continuations of T tokens each (greedy, run to
   T whatever they generate, so no batch shrinks early), all on one adapter, then half on
   each adapter, then on the base model; throughput as generated tokens over wall time,
   the median of R repetitions. Every row of the mixed batch must give the text it gives
   in a batch of its own adapter (checked, reported).
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import mlx.core as mx

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import ROOT, SMOLLM2, Harness, arguments, write_results
from semantic_server.engine.batch_engine import batch_generator
from semantic_server.swap_result import SwapMode

ADAPTERS = ("capitals", "signature")
PROMPTS = ("The history of the old port began when", "In the mountains north of the city,",
           "The engineer opened the notebook and wrote", "Every morning the market square")


def continuation_prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + f" (part {i})" for i in range(batch)]


def swap_times(harness: Harness, repeats: int) -> dict[str, Any]:
    reloads = [harness.swap(SMOLLM2, SwapMode.DUAL) for _ in range(repeats)]
    reload_ms = [r["duration_ms"] for r in reloads]
    load_ms = [next(s["duration_ms"] for s in r["steps"] if s["name"] == "load")
               for r in reloads]
    swapper, versions = harness.server.adapter_swapper, harness.server.versions
    loaded, memory_before = versions.loaded, mx.get_active_memory()
    swaps = [harness.run(swapper.swap(SMOLLM2, ADAPTERS[i % 2])).as_dict()
             for i in range(repeats * 2)]
    same_model = versions.loaded is loaded  # no reload: the same load, the same weights
    if any(s["status"] != "success" or not s["copied"] for s in swaps):
        raise RuntimeError(f"an adapter swap failed or copied nothing: {swaps}")
    swap_ms = [s["duration_ms"] for s in swaps]
    return {
        "reload_ms": reload_ms, "reload_load_step_ms": load_ms, "adapter_swap_ms": swap_ms,
        "adapter_copy_ms": [s["copy_ms"] for s in swaps],
        "adapter_check_ms": [s["check_ms"] for s in swaps],
        "median_reload_ms": statistics.median(reload_ms),
        "median_adapter_swap_ms": statistics.median(swap_ms),
        "ratio_adapter_swap_to_reload": statistics.median(swap_ms) / statistics.median(reload_ms),
        "ratio_adapter_swap_to_load_step": statistics.median(swap_ms) / statistics.median(load_ms),
        "same_model_load_after_adapter_swaps": same_model,
        "active_memory_change_bytes": mx.get_active_memory() - memory_before,
    }


def batch_run(harness: Harness, models: list[str], tokens: int) -> tuple[float, list[str]]:
    """Decode throughput (generated tokens per second of wall time) and the texts."""
    prompts = continuation_prompts(len(models))
    started = time.perf_counter()
    turns = harness.turns([(None, prompt) for prompt in prompts], tokens, list(models))
    seconds = time.perf_counter() - started
    return sum(t.generated for t in turns) / seconds, [t.text for t in turns]


def mixed_batch(harness: Harness, batch: int, tokens: int, repeats: int) -> dict[str, Any]:
    caps, sig = (f"{SMOLLM2}:{name}" for name in ADAPTERS)
    layouts = {
        "base": [SMOLLM2] * batch,
        "one_adapter": [caps] * batch,
        "two_adapters": [caps if i % 2 == 0 else sig for i in range(batch)],
    }
    batch_run(harness, layouts["two_adapters"], 4)  # both adapters resident, kernels warm
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, models in layouts.items():
            rate, texts[name] = batch_run(harness, models, tokens)
            rates[name].append(rate)
    alone_sig = batch_run(harness, [sig] * batch, tokens)[1]
    expected = [texts["one_adapter"][i] if i % 2 == 0 else alone_sig[i] for i in range(batch)]
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "batch": batch, "tokens": tokens, "repeats": repeats, "tokens_per_second": rates,
        "median_tokens_per_second": medians,
        "ratio_two_adapters_to_one": medians["two_adapters"] / medians["one_adapter"],
        "ratio_one_adapter_to_base": medians["one_adapter"] / medians["base"],
        "mixed_rows_match_their_own_batch": texts["two_adapters"] == expected,
    }


def plot(data: dict[str, Any], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    swaps = data["swap"]
    left.bar(["full reload (dual swap)", "reload: load step", "adapter swap"],
             [swaps["median_reload_ms"], statistics.median(swaps["reload_load_step_ms"]),
              swaps["median_adapter_swap_ms"]], color=["#999", "#bbb", "#2a7"])
    left.set_yscale("log")
    left.set_ylabel("milliseconds (median, log scale)")
    left.set_title(f"Swap time: adapter {100 * swaps['ratio_adapter_swap_to_reload']:.2f}% "
                   f"of a reload")
    mixed = data["mixed"]["median_tokens_per_second"]
    right.bar(list(mixed), list(mixed.values()), color=["#999", "#27a", "#a72"])
    right.set_ylabel("generated tokens / s (median)")
    right.set_title(f"Batch of {data['mixed']['batch']}: mixed / one adapter = "
                    f"{data['mixed']['ratio_two_adapters_to_one']:.2f}x")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    repeats, batch, tokens = (2, 4, 8) if args.quick else (5, 8, 48)
    missing = [name for name in ADAPTERS if not (ROOT / "adapters" / name).is_dir()]
    if missing:
        raise SystemExit(f"adapters {missing} are missing: run scripts/train_adapters")
    data = {}
    # One adapter slot (and "none"): every swap between the two adapters copies.
    harness = Harness(adapters_dir=ROOT / "adapters", lora_slots=2)
    try:
        data["swap"] = swap_times(harness, repeats)
    finally:
        harness.close()
    # Two adapter slots, so both adapters run in one batch.
    harness = Harness(make_generator=partial(batch_generator, stop_at_eos=False),
                      adapters_dir=ROOT / "adapters", lora_slots=3)
    try:
        data["mixed"] = mixed_batch(harness, batch, tokens, repeats)
    finally:
        harness.close()
    name = "exp016_adapter_swap" + ("_quick" if args.quick else "")
    write_results(name, data, args.results)
    plot(data, args.results / f"{name}.png")
    swaps, mixed = data["swap"], data["mixed"]
    print(f"reload {swaps['median_reload_ms']:.0f} ms, adapter swap "
          f"{swaps['median_adapter_swap_ms']:.2f} ms "
          f"({100 * swaps['ratio_adapter_swap_to_reload']:.2f}% of the reload)")
    print(f"decode tok/s: {mixed['median_tokens_per_second']}; two adapters / one = "
          f"{mixed['ratio_two_adapters_to_one']:.2f}x; rows match: "
          f"{mixed['mixed_rows_match_their_own_batch']}")


if __name__ == "__main__":
    main()
