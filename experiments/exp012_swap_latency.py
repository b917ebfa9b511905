"""EXP-012: how long does a swap take, step by step, and what is its floor?

Per-step timings (drain, evict, shutdown, unload, load, reconfigure, retag, reinit) for
SmolLM2 -> Gemma, Gemma -> SmolLM2 and same -> same, with 0, 8 and 32 agents holding caches,
N repetitions each, through the real orchestrator (in process). In the same run, the floor:
a bare ``mlx_lm.load`` of each target plus a one-token warm-up, as a user would do by hand.
"""

from __future__ import annotations

import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import (
    GEMMA,
    SMOLLM2,
    Harness,
    arguments,
    away_model,
    history,
    write_results,
)
from semantic_server.models.registry import resolve_compute_dtype
from semantic_server.swap.orchestrator import SEQUENTIAL_STEPS


def raw_load_seconds(harness: Harness, model_id: str) -> float:
    """mlx_lm.load + warm-up of ``model_id`` on the engine thread, nothing of ours around it
    but the CPU's float32 conversion (which any CPU user of these weights needs)."""
    def load() -> float:
        import mlx.core as mx
        from mlx_lm import load as mlx_load
        from mlx_lm.utils import dequantize_model

        started = time.perf_counter()
        model, tokenizer = mlx_load(str(harness.server.catalog.resolve(model_id)))
        dtype = resolve_compute_dtype("auto")
        if dtype is not None:
            model = dequantize_model(model)
            model.set_dtype(dtype)
            mx.eval(model.parameters())
        mx.eval(model(mx.array([tokenizer.encode("Hello")]))[0, -1])
        seconds = time.perf_counter() - started
        del model, tokenizer
        mx.clear_cache()
        return seconds
    return harness.run(harness.server.engine.on_thread(load))


def warm_agents(harness: Harness, count: int, tokens: int) -> None:
    requests = [(f"latency-agent-{i}", [{"role": "user", "content": history(i, tokens)}])
                for i in range(count)]
    for start in range(0, count, 8):
        harness.turns(requests[start:start + 8], max_tokens=1)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    repetitions = 1 if args.quick else 3
    agent_counts = (2,) if args.quick else (0, 8, 32)
    agent_tokens = 64 if args.quick else 200
    away, settings = away_model(args.quick)
    harness = Harness(SMOLLM2, **settings)
    directions = ((SMOLLM2, away), (away, SMOLLM2), (SMOLLM2, SMOLLM2))
    runs = []
    floors: dict[str, list[float]] = {SMOLLM2: [], away: []}
    try:
        for source, target in directions:
            for agents in agent_counts:
                for rep in range(repetitions):
                    if harness.server.snapshot().model_id != source:
                        harness.swap(source)
                    warm_agents(harness, agents, agent_tokens)
                    result = harness.swap(target)
                    steps = {s["name"]: s["duration_ms"] for s in result["steps"]}
                    runs.append({"source": source, "target": target, "agents": agents,
                                 "repetition": rep, "total_ms": result["duration_ms"],
                                 "evicted": result["evicted_agents"], "steps_ms": steps})
                    print(f"{source} -> {target}, {agents:2d} agents: "
                          f"{result['duration_ms']:8.1f} ms  " +
                          " ".join(f"{k}={v:.1f}" for k, v in steps.items()), flush=True)
        for model in (SMOLLM2, away):
            for _ in range(repetitions):
                floors[model].append(raw_load_seconds(harness, model) * 1e3)
            print(f"floor {model}: mlx_lm.load + warm-up {statistics.median(floors[model]):.1f} ms")
    finally:
        harness.close()

    summary = []
    for source, target in directions:
        for agents in agent_counts:
            group = [r for r in runs if (r["source"], r["target"], r["agents"]) ==
                     (source, target, agents)]
            totals = [r["total_ms"] for r in group]
            overhead = [sum(r["steps_ms"][s] for s in ("drain", "shutdown", "reconfigure",
                                                        "retag", "reinit")) for r in group]
            floor = statistics.median(floors[target])
            summary.append({
                "source": source, "target": target, "agents": agents,
                "total_median_ms": statistics.median(totals),
                "total_min_ms": min(totals), "total_max_ms": max(totals),
                "steps_median_ms": {s: statistics.median(r["steps_ms"][s] for r in group)
                                    for s in SEQUENTIAL_STEPS},
                "control_overhead_median_ms": statistics.median(overhead),
                "floor_ms": floor,
                "total_over_floor": statistics.median(totals) / floor,
            })
    write_results("exp012_swap_latency", {"runs": runs, "floors_ms": floors,
                                          "summary": summary}, args.results)

    fig, ax = plt.subplots(figsize=(12, 5))
    short = {SMOLLM2: "SmolLM2", GEMMA: "Gemma", away: "SmolLM2 alias"}
    labels = [f"{short[s['source']]}->{short[s['target']]}\n{s['agents']} agents"
              for s in summary]
    bottom = [0.0] * len(summary)
    for step in SEQUENTIAL_STEPS:
        values = [s["steps_median_ms"][step] / 1e3 for s in summary]
        ax.bar(labels, values, bottom=bottom, label=step)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.scatter(labels, [s["floor_ms"] / 1e3 for s in summary], color="black", marker="_",
               s=400, label="floor: mlx_lm.load + warm-up", zorder=3)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("seconds (median)")
    ax.set_title("EXP-012: swap latency per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.results / "exp012_swap_latency.png", dpi=120)

    print(f"\n{'direction':40s} {'agents':>6s} {'total ms':>10s} {'floor ms':>9s} {'ratio':>6s} "
          f"{'control ms':>10s}")
    for s in summary:
        print(f"{s['source'] + ' -> ' + s['target']:40s} {s['agents']:6d} "
              f"{s['total_median_ms']:10.1f} {s['floor_ms']:9.1f} {s['total_over_floor']:6.2f} "
              f"{s['control_overhead_median_ms']:10.2f}")


if __name__ == "__main__":
    main()
