"""EXP-011: does memory come back over many swaps?

20 swaps alternating SmolLM2 and Gemma through the real orchestrator (in process), with an
agent turn on each model so caches are evicted too. After each swap: MLX active and peak
memory and process RSS. The last swap's figures are compared with the first swap to the same
model; within 5% means nothing accumulates.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import SMOLLM2, Harness, arguments, away_model, write_results
from semantic_server.models.registry import MemorySnapshot


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    swaps = 4 if args.quick else 20
    away, settings = away_model(args.quick)
    harness = Harness(SMOLLM2, **settings)
    rows = []
    try:
        for i in range(swaps):
            target = away if i % 2 == 0 else SMOLLM2
            result = harness.swap(target)
            harness.turn(f"memory-agent-{i % 3}", [{"role": "user", "content": "Hello there."}])
            memory = MemorySnapshot.now()
            rows.append({"swap": i + 1, "model": target, "duration_ms": result["duration_ms"],
                         "active_mb": memory.active_bytes / 1e6,
                         "peak_mb": memory.peak_bytes / 1e6, "rss_mb": memory.rss_bytes / 1e6})
            print(f"swap {i + 1:2d} -> {target:22s} active {rows[-1]['active_mb']:7.1f} MB  "
                  f"peak {rows[-1]['peak_mb']:7.1f} MB  RSS {rows[-1]['rss_mb']:7.1f} MB",
                  flush=True)
    finally:
        harness.close()

    verdicts = {}
    for model in (away, SMOLLM2):
        series = [r for r in rows if r["model"] == model]
        first, last = series[0], series[-1]
        verdicts[model] = {
            key: {"first": first[key], "last": last[key],
                  "change_pct": 100 * (last[key] - first[key]) / first[key]}
            for key in ("active_mb", "rss_mb")}
    within = all(abs(v[k]["change_pct"]) <= 5 for v in verdicts.values() for k in v)
    write_results("exp011_memory_reclamation", {"swaps": rows, "comparison": verdicts,
                                                "within_5_percent": within}, args.results)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("active_mb", "MLX active"), ("peak_mb", "MLX peak"),
                       ("rss_mb", "process RSS")):
        ax.plot([r["swap"] for r in rows], [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("swap number (odd: to Gemma 3 270M, even: to SmolLM2 135M)")
    ax.set_ylabel("MB")
    ax.set_title("EXP-011: memory after each swap")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.results / "exp011_memory_reclamation.png", dpi=120)
    for model, figures in verdicts.items():
        print(f"{model}: active {figures['active_mb']['change_pct']:+.2f}%, "
              f"RSS {figures['rss_mb']['change_pct']:+.2f}% (last vs first swap to it)")
    print(f"memory after the last swap within 5% of after the first: {'yes' if within else 'no'}")


if __name__ == "__main__":
    main()
