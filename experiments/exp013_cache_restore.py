"""EXP-013: restoring an agent's cache from disk against prefilling it again.

For 512, 1K, 2K and 4K tokens of agent history on SmolLM2, the TTFT of the agent's next turn
by three paths: cold (a fresh agent prefills the whole prompt), hot (the agent's cache is in
memory) and disk (the cache was evicted by a swap round trip SmolLM2 -> Gemma -> SmolLM2 and
is read back). Also the read bandwidth of the cache files (bytes / load time, arrays
materialised) against a plain read of the same file, and the speedups beside the seed
system's published cold -> warm TTFT speedups.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlx.core as mx

from experiments.harness import SMOLLM2, Harness, arguments, away_model, history, write_results
from semantic_server.cache.cache_file import agent_file_name, read_cache

SEED_SYSTEM_SPEEDUP = {1024: 8.3, 2048: 14.4, 4096: 27.3}  # agent-memory, cold -> warm TTFT


def read_seconds(path: Path) -> tuple[float, float]:
    """(cache-file load with every array materialised, plain read of the same bytes)."""
    started = time.perf_counter()
    loaded = read_cache(path)
    mx.eval([layer.state for layer in loaded.layers])
    cache_load = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass
    return cache_load, time.perf_counter() - started


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    lengths = (64, 128) if args.quick else (512, 1024, 2048, 4096)
    away, settings = away_model(args.quick)
    harness = Harness(SMOLLM2, max_context_tokens=8192, **settings)
    rows = []
    try:
        conversations = {}
        for length in lengths:
            agent = f"restore-agent-{length}"
            messages = [{"role": "user", "content": history(length, length)}]
            first = harness.turn(agent, messages, max_tokens=8)
            messages += [{"role": "assistant", "content": first.text},
                         {"role": "user", "content": "Continue the notes."}]
            hot = harness.turn(agent, messages, max_tokens=4)
            cold = harness.turn(f"restore-fresh-{length}", messages, max_tokens=4)
            messages += [{"role": "assistant", "content": hot.text},
                         {"role": "user", "content": "And then?"}]
            conversations[length] = (agent, messages, hot, cold)
            print(f"{length:5d} tokens: cold {cold.ttft:7.3f} s (prompt {cold.prompt}), "
                  f"hot {hot.ttft:7.3f} s (cached {hot.cached})", flush=True)
        harness.swap(away)
        harness.swap(SMOLLM2)
        tag = harness.server.snapshot().tag
        for length, (agent, messages, hot, cold) in conversations.items():
            path = harness.cache_dir / tag / agent_file_name(agent)
            size = path.stat().st_size
            cache_load, plain = harness.run(harness.server.engine.on_thread(
                lambda p=path: read_seconds(p)))
            disk = harness.turn(agent, messages, max_tokens=4)
            rows.append({
                "history_tokens": cold.prompt, "nominal": length,
                "ttft_cold_s": cold.ttft, "ttft_hot_s": hot.ttft, "ttft_disk_s": disk.ttft,
                "cached_hot": hot.cached, "cached_disk": disk.cached,
                "speedup_hot": cold.ttft / hot.ttft, "speedup_disk": cold.ttft / disk.ttft,
                "disk_over_cold": disk.ttft / cold.ttft,
                "file_bytes": size, "cache_load_s": cache_load, "plain_read_s": plain,
                "cache_load_gbps": size / cache_load / 1e9, "plain_read_gbps": size / plain / 1e9,
                "load_over_plain": cache_load / plain,
                "seed_system_speedup": SEED_SYSTEM_SPEEDUP.get(length),
            })
            print(f"{length:5d} tokens: disk {disk.ttft:7.3f} s (cached {disk.cached}); file "
                  f"{size / 1e6:.1f} MB loads in {cache_load * 1e3:.1f} ms vs plain read "
                  f"{plain * 1e3:.1f} ms", flush=True)
    finally:
        harness.close()
    write_results("exp013_cache_restore", {"rows": rows}, args.results)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = [r["nominal"] for r in rows]
    for key, label in (("ttft_cold_s", "cold prefill"), ("ttft_hot_s", "hot (in memory)"),
                       ("ttft_disk_s", "restored from disk after a swap round trip")):
        left.plot(xs, [r[key] for r in rows], marker="o", label=label)
    left.set_yscale("log")
    left.set_xlabel("agent history (tokens)")
    left.set_ylabel("TTFT (s, log)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.plot(xs, [r["speedup_disk"] for r in rows], marker="o", label="ours: cold / disk")
    right.plot(xs, [r["speedup_hot"] for r in rows], marker="o", label="ours: cold / hot")
    seeds = [(r["nominal"], r["seed_system_speedup"]) for r in rows if r["seed_system_speedup"]]
    if seeds:
        right.plot(*zip(*seeds, strict=True), marker="s", label="seed system: cold / warm")
    right.set_xlabel("agent history (tokens)")
    right.set_ylabel("TTFT speedup (x)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("EXP-013: cache restore vs re-prefill (SmolLM2 135M)")
    fig.tight_layout()
    fig.savefig(args.results / "exp013_cache_restore.png", dpi=120)

    print(f"\n{'tokens':>6s} {'cold s':>8s} {'hot s':>8s} {'disk s':>8s} {'cold/disk':>9s} "
          f"{'seed':>6s} {'load/plain':>10s}")
    for r in rows:
        seed = f"{r['seed_system_speedup']:.1f}" if r["seed_system_speedup"] else "-"
        print(f"{r['history_tokens']:6d} {r['ttft_cold_s']:8.3f} {r['ttft_hot_s']:8.3f} "
              f"{r['ttft_disk_s']:8.3f} {r['speedup_disk']:9.1f} {seed:>6s} "
              f"{r['load_over_plain']:10.2f}")


if __name__ == "__main__":
    main()
