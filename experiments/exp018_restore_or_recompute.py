"""EXP-018 (restore or recompute): where reading a cache back from disk stops paying.

For each history length T (16 to 2,048 tokens), an agent on SmolLM2 (in process, native
files with the default chunks) sends a prompt of T tokens: ``cold`` is that first turn's
TTFT (prefilling all T). Its cache is then evicted to disk and the same prompt sent again:
``restore`` is that turn's TTFT (the file read back, checksums included, then one token
prefilled). The crossover is the length below which prefilling is faster than restoring.
The medians of R repetitions (distinct texts), interleaved per length.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import Harness, arguments, history, write_results


def prompt(agent: int, tokens: int) -> list[dict[str, str]]:
    # the chat template adds about 30 tokens; the text makes up the rest
    return [{"role": "user", "content": history(agent, max(1, tokens - 30))}]


def measure(harness: Harness, lengths: list[int], repeats: int) -> dict[str, Any]:
    server = harness.server
    rows = []
    for rep in range(repeats):
        for n, tokens in enumerate(lengths):
            agent = f"r{rep}-{tokens}"
            messages = prompt(rep * 100 + n, tokens)
            cold = harness.turn(agent, messages, max_tokens=1)
            harness.run(server.engine.on_thread(server.store.evict_all))
            restored = harness.turn(agent, messages, max_tokens=1)
            assert restored.cached == cold.prompt - 1, (restored.cached, cold.prompt)
            rows.append({"tokens": cold.prompt, "target": tokens, "cold": cold.ttft,
                         "restore": restored.ttft})
            print(f"{cold.prompt:>5} tokens: cold {cold.ttft * 1e3:8.1f} ms, restore "
                  f"{restored.ttft * 1e3:8.1f} ms", flush=True)
    medians = {}
    for tokens in lengths:
        mine = [row for row in rows if row["target"] == tokens]
        medians[tokens] = {key: statistics.median(row[key] for row in mine)
                           for key in ("tokens", "cold", "restore")}
        medians[tokens]["restore_over_cold"] = (medians[tokens]["restore"]
                                                / medians[tokens]["cold"])
    faster = [tokens for tokens in lengths if medians[tokens]["restore_over_cold"] >= 1]
    return {"lengths": lengths, "repeats": repeats, "rows": rows, "medians": medians,
            "recompute_faster_at": faster,
            "crossover_tokens": max(faster) if faster else None}


def plot(data: dict[str, Any], path: Path) -> None:
    lengths = data["lengths"]
    medians = data["medians"]
    fig, axis = plt.subplots(figsize=(7, 4.2))
    for key, colour in (("cold", "#999"), ("restore", "tab:green")):
        axis.plot([medians[t]["tokens"] for t in lengths],
                  [medians[t][key] * 1e3 for t in lengths], "o-", color=colour,
                  label={"cold": "prefill (cold)", "restore": "restore from disk"}[key])
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("history (tokens)")
    axis.set_ylabel("median TTFT (ms)")
    axis.legend()
    axis.set_title("EXP-018: restore or recompute (SmolLM2, native files)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    lengths, repeats = ([48, 128], 1) if args.quick else (
        [48, 64, 128, 256, 512, 1024, 2048], 3)
    harness = Harness(max_context_tokens=8192)
    try:
        data = measure(harness, lengths, repeats)
    finally:
        harness.close()
    for tokens in lengths:
        row = data["medians"][tokens]
        print(f"{row['tokens']:>6.0f} tokens: restore {row['restore_over_cold']:.3f}x cold")
    print("crossover:", data["crossover_tokens"])
    name = "exp018_restore_or_recompute" + ("_quick" if args.quick else "")
    path = write_results(name, data, args.results)
    plot(data, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
