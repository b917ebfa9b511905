"""Model benchmark (not a test): load time, prefill and decode tokens/s of each real model,
with OpenBLAS and with MLX's bundled reference BLAS, measured in one run.

Each configuration runs in its own process, because the BLAS is chosen when the process
first imports mlx. Usage: .venv/bin/python scripts/bench_models.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import semantic_server  # noqa: F401  (picks the BLAS from SEMANTIC_BLAS_LIBRARY before mlx)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("smollm2-135m-instruct", "gemma3-270m")
PROMPT = "The history of the harbour town begins with its fishermen and its salt trade. " * 40


def measure(model_id: str) -> dict:
    """In this process: load, a ~600-token prefill and a 64-token greedy decode."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from semantic_server.blas import blas_status
    from semantic_server.models.catalog import ModelCatalog
    from semantic_server.models.registry import ModelRegistry

    registry = ModelRegistry(ModelCatalog(ROOT / "models"))
    loaded = registry.load(model_id)
    tokens = loaded.tokenizer.encode(PROMPT)
    cache = loaded.model.make_cache()
    started = time.perf_counter()
    mx.eval(loaded.model(mx.array([tokens]), cache=cache))
    prefill = len(tokens) / (time.perf_counter() - started)
    steps = generate_step(mx.array(tokens[:16]), loaded.model, max_tokens=65)
    next(steps)  # the first token includes the 16-token prompt
    started = time.perf_counter()
    count = sum(1 for _ in steps)
    decode = count / (time.perf_counter() - started)
    return {"model": model_id, "blas": blas_status().name, "load_s": loaded.stats.seconds,
            "prefill_tokens": len(tokens), "prefill_tps": prefill, "decode_tps": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "experiments" / "results" / "bench_models.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    rows = []
    for blas in ("auto", "off"):
        for model_id in MODELS:
            env = {**os.environ, "SEMANTIC_BLAS_LIBRARY": blas}
            out = subprocess.run([sys.executable, __file__, "--child", model_id], env=env,
                                 capture_output=True, text=True, check=True, cwd=ROOT).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['model']:24s} {r['blas']:10s} load {r['load_s']:5.2f} s  prefill "
                  f"{r['prefill_tps']:6.1f} tok/s ({r['prefill_tokens']} tokens)  decode "
                  f"{r['decode_tps']:5.1f} tok/s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
