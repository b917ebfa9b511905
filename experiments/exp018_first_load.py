"""EXP-018 (first load): a model's first load in a process against reading its weights.

Every figure comes from a fresh process that has made the server's imports first (a server
makes them at startup), so no tokenizer is cached in it; the weights' file is in the page
cache (read once before the rounds), so reading it is the floor of any load. Per model, 5
rounds (1 with --quick) of these measures, in a rotating order:

* ``read``: ``mx.load`` of model.safetensors and its evaluation: reading the weights alone;
* ``weights``: the registry's load with the tokenizer built before the clock starts: what
  the server does with the weights (float32 on the CPU, its warm-up);
* ``tokenizer_mlx_lm`` and ``tokenizer``: the tokenizer alone, built by mlx-lm's
  ``load_tokenizer`` and by ``models.tokenizer.load_tokenizer``;
* ``first_load_before``: mlx-lm's tokenizer, then the registry's load of the weights, as the
  server loaded a model before models/tokenizer.py;
* ``first_load``: ``ModelRegistry.load``, as the server loads a model now.

Each measure gives its wall time and its process's CPU time over the same span: on a shared
machine the wall time is noisy, the CPU time less so.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.harness import GEMMA, ROOT, SMOLLM2, arguments, write_results

MEASURES = ("read", "weights", "tokenizer_mlx_lm", "tokenizer", "first_load_before",
            "first_load")


def measure(model_id: str, name: str) -> tuple[float, float]:
    """Wall and CPU seconds of one measure, in this process (``--one``; importing the
    harness has made the server's imports)."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    from semantic_server.models.catalog import ModelCatalog
    from semantic_server.models.registry import ModelRegistry, Prepared, run_slices
    from semantic_server.models.tokenizer import load_tokenizer

    registry = ModelRegistry(ModelCatalog(ROOT / "models"))
    path = registry.catalog.resolve(model_id)
    config = registry.catalog.read_config(model_id)
    eos = config.get("eos_token_id")

    def load_weights(tokenizer: Any) -> None:
        run_slices(registry.load_slices(Prepared(model_id, path, config, tokenizer)))

    if name == "weights":
        tokenizer = load_tokenizer(path, eos_token_ids=eos)
    started, cpu = time.perf_counter(), time.process_time()
    if name == "read":
        mx.eval(mx.load(str(path / "model.safetensors")))
    elif name == "weights":
        load_weights(tokenizer)
    elif name == "tokenizer_mlx_lm":
        mlx_load_tokenizer(path, eos_token_ids=eos)
    elif name == "tokenizer":
        load_tokenizer(path, eos_token_ids=eos)
    elif name == "first_load_before":
        load_weights(mlx_load_tokenizer(path, eos_token_ids=eos))
    elif name == "first_load":
        registry.load(model_id)
    return time.perf_counter() - started, time.process_time() - cpu


def in_fresh_process(model_id: str, name: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-m", "experiments.exp018_first_load", "--one",
                          model_id, name], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    figures = json.loads(out.splitlines()[-1])
    return figures["seconds"], figures["cpu_seconds"]


def summary(rows: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in rows.items()}
    return {
        "seconds": rows, "median_seconds": median, "cpu_seconds": cpu,
        "median_cpu_seconds": {name: statistics.median(values) for name, values in cpu.items()},
        "first_load_vs_read": median["first_load"] / median["read"],
        "first_load_vs_weights": median["first_load"] / median["weights"],
        "first_load_before_vs_weights": median["first_load_before"] / median["weights"],
        "first_load_vs_before": median["first_load"] / median["first_load_before"],
        "tokenizer_vs_mlx_lm": median["tokenizer"] / median["tokenizer_mlx_lm"],
    }


def main() -> None:
    args = arguments(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--one", nargs=2, metavar=("MODEL", "MEASURE"), help="one measure, in this process"))
    if args.one:
        seconds, cpu = measure(*args.one)
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
        return
    rounds = 1 if args.quick else 5
    data: dict[str, Any] = {"rounds": rounds, "models": {}}
    for model_id in (GEMMA, SMOLLM2):
        (ROOT / "models" / model_id / "model.safetensors").read_bytes()  # into the page cache
        rows: dict[str, list[float]] = {name: [] for name in MEASURES}
        cpu: dict[str, list[float]] = {name: [] for name in MEASURES}
        for r in range(rounds):
            for name in MEASURES[r % len(MEASURES):] + MEASURES[:r % len(MEASURES)]:
                seconds, cpu_seconds = in_fresh_process(model_id, name)
                rows[name].append(seconds)
                cpu[name].append(cpu_seconds)
                print(f"{model_id} round {r + 1}: {name:18s} {seconds:6.2f} s "
                      f"(CPU {cpu_seconds:6.2f} s)", flush=True)
        data["models"][model_id] = summary(rows, cpu)
        figures = data["models"][model_id]
        print(f"{model_id}: first load {figures['median_seconds']['first_load']:.2f} s = "
              f"{figures['first_load_vs_read']:.1f}x reading the weights, "
              f"{figures['first_load_vs_weights']:.2f}x the weights' load "
              f"(before: {figures['first_load_before_vs_weights']:.2f}x)", flush=True)
    write_results("exp018_first_load" + ("_quick" if args.quick else ""), data,
                  Path(args.results))


if __name__ == "__main__":
    main()
