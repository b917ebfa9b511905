"""EXP-018 (disk formats): what each cache file format costs and keeps, in one run.

One agent's turn builds a cache of about T tokens (default 2,000) on SmolLM2. Then, per
format of ``SEMANTIC_CACHE_DISK_FORMAT`` (native, float16, q8, q4):

* **bytes per token** of the agent's cache file;
* **restore time**: reading the file back (``read_cache``, checksums included), the
  median of R reads;
* **fidelity**: the agent's next turn restored from that file, 32 greedy tokens (run to
  32 past any end-of-sequence token), against the same turn with the cache never written
  (it stayed hot: the unswapped run). Reported as the share of the 32 positions that
  agree and the length of the common prefix.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import Harness, arguments, history, write_results
from semantic_server.cache.cache_file import agent_file_name, read_cache
from semantic_server.config import DiskFormat
from semantic_server.engine.batch_engine import batch_generator

TOKENS_OUT = 32


def messages(agent: int, tokens: int, reply: str | None = None) -> list[dict[str, str]]:
    first = [{"role": "user", "content": history(agent, tokens) + "\nSummarise these notes."}]
    if reply is None:
        return first
    return [*first, {"role": "assistant", "content": reply},
            {"role": "user", "content": "Now list three details from them."}]


def measure(harness: Harness, tokens: int, repeats: int) -> dict[str, Any]:
    server = harness.server
    store = server.store
    encode = server.versions.loaded.tokenizer.encode  # the replies as token ids
    # The unswapped reference: the agent's second turn with its cache hot all along.
    first = harness.turn("reference", messages(0, tokens), max_tokens=8)
    reference = harness.turn("reference", messages(0, tokens, first.text), TOKENS_OUT)
    rows = {}
    for fmt in DiskFormat:
        agent = f"agent-{fmt.value}"
        turn = harness.turn(agent, messages(0, tokens), max_tokens=8)
        assert turn.text == first.text, "the same turn must give the same reply"
        store.disk_format = fmt
        harness.run(server.engine.on_thread(store.evict_all))
        tag_folder = next(p.parent for p in store.cold_files()
                          if p.name == agent_file_name(agent))
        path = tag_folder / agent_file_name(agent)
        size = path.stat().st_size
        reads = []
        for _ in range(repeats):
            started = time.perf_counter()
            read_cache(path)
            reads.append(time.perf_counter() - started)
        restored = harness.turn(agent, messages(0, tokens, first.text), TOKENS_OUT)
        assert restored.cached > 0.9 * turn.prompt, (restored.cached, turn.prompt)
        ours, theirs = (encode(t.text)[:TOKENS_OUT] for t in (restored, reference))
        same = [a == b for a, b in zip(ours, theirs, strict=False)]
        same += [False] * (TOKENS_OUT - len(same))
        prefix = next((i for i, ok in enumerate(same) if not ok), len(same))
        rows[fmt.value] = {
            "file_bytes": size, "cached_tokens": turn.prompt + turn.generated,
            "bytes_per_token": size / (turn.prompt + turn.generated),
            "restore_ms_median": statistics.median(reads) * 1e3,
            "greedy_agreement": sum(same) / TOKENS_OUT, "common_prefix_tokens": prefix,
            "text": restored.text,
        }
        print(f"{fmt.value:>8}: {rows[fmt.value]['bytes_per_token']:8.0f} B/token, restore "
              f"{rows[fmt.value]['restore_ms_median']:7.1f} ms, agreement "
              f"{rows[fmt.value]['greedy_agreement']:.2f} (prefix {prefix})", flush=True)
    native = rows["native"]["file_bytes"]
    for row in rows.values():
        row["bytes_vs_native"] = row["file_bytes"] / native
    return {"tokens": tokens, "tokens_out": TOKENS_OUT, "reference_text": reference.text,
            "formats": rows}


def plot(data: dict[str, Any], path: Path) -> None:
    rows = data["formats"]
    names = list(rows)
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for axis, key, title in zip(axes, ("bytes_per_token", "restore_ms_median",
                                       "greedy_agreement"),
                                ("bytes per token on disk", "restore (ms, median)",
                                 f"greedy agreement over {TOKENS_OUT} tokens"), strict=True):
        axis.bar(names, [rows[n][key] for n in names], color=["#999", "#27a", "#a72", "#2a7"])
        axis.set_title(title)
    axes[2].set_ylim(0, 1.05)
    figure.suptitle(f"Cache file formats, SmolLM2, {data['tokens']}-token history")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    tokens, repeats = (300, 2) if args.quick else (2000, 5)
    harness = Harness(make_generator=partial(batch_generator, stop_at_eos=False),
                      max_context_tokens=8192)
    try:
        data = measure(harness, tokens, repeats)
    finally:
        harness.close()
    name = "exp018_disk_formats" + ("_quick" if args.quick else "")
    write_results(name, data, args.results)
    plot(data, args.results / f"{name}.png")


if __name__ == "__main__":
    main()
