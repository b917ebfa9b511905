"""Serving benchmark on SmolLM2 (not a test): prints a table and writes JSON.

(a) single-stream decode tokens/s, ours against ``mlx_lm.generate`` on the same weights
    (5 repetitions, alternating which runs first; the median of the per-repetition ratios);
(b) aggregate decode tokens/s with 8 concurrent agents against 1;
(c) TTFT of an agent's turn with about 2,000 tokens of cached history against the same
    turn cold;
(d) the same 20-request shared-prefix workload against ``mlx_lm.server`` on the same
    weights. Both servers get the same float32 weights and OpenBLAS (the peer's strongest
    fair configuration on this CPU: its quantized path would be several times slower);
(e) decode tokens/s of a request under a JSON-schema constraint against the same request
    unconstrained, in the same run;
(f) the time to compile the answer grammar of 10 tools (in process), and the generic tool
    format's prompt overhead in tokens for 1 and 10 tools.

Usage: .venv/bin/python scripts/bench_serving.py [--parts abcdef]
       [--out experiments/results/bench_serving.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiments.peers import MlxLmServer, float32_copy, stream_turn  # noqa: E402
from semantic_server.blas import blas_status  # noqa: E402  (loads OpenBLAS before mlx)
from tests.servers import ServerProcess  # noqa: E402

MODEL = "smollm2-135m-instruct"
SINGLE_REPETITIONS = 5
SHARED_PREFIX = ("You are a support assistant for a bicycle shop. " +
                 "The shop sells road bikes, mountain bikes, helmets, lights and locks; it "
                 "repairs punctures, brakes and gears, and opens from nine to six. " * 40)


def mlx_generate_tps(model_dir: Path, prompt: str, max_tokens: int) -> float:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.utils import dequantize_model

    model, tokenizer = load(str(model_dir))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True)
    responses = list(stream_generate(model, tokenizer, ids, max_tokens=max_tokens))
    return responses[-1].generation_tps


def shared_prefix_workload(url: str, model: str | None) -> list[float]:
    """20 sequential anonymous requests sharing a long system prompt."""
    latencies = []
    for i in range(20):
        messages = [{"role": "system", "content": SHARED_PREFIX},
                    {"role": "user", "content": f"Question {i}: do you repair brakes?"}]
        latencies.append(stream_turn(url, messages, 16, model=model)["total"])
    return latencies


STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"},
                                                "story": {"type": "string"}},
                "required": ["title", "story"], "additionalProperties": False}


def constrained_decode(url: str, story: str, repetitions: int = 3) -> dict:
    """(e): the same greedy request, free and under a JSON schema, alternately."""
    free, constrained = [], []
    schema = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "schema": STORY_SCHEMA}}}
    messages = [{"role": "user", "content": story}]
    stream_turn(url, messages, 4, extra=schema)  # builds the tokenizer view once
    for _ in range(repetitions):
        free.append(stream_turn(url, messages, 128)["decode_tps"])
        constrained.append(stream_turn(url, messages, 128, extra=schema)["decode_tps"])
    return {"free_tps": statistics.median(free),
            "constrained_tps": statistics.median(constrained),
            "ratio": statistics.median(constrained) / statistics.median(free),
            "free_runs": free, "constrained_runs": constrained}


def tool_grammar_costs(model_dir: Path) -> dict:
    """(f): compile time of 10 tools' answer grammar, and the tool prompt's tokens."""
    from mlx_lm.utils import load_tokenizer

    from semantic_server.api import tools as t
    from semantic_server.engine.constraints import GrammarProcessor, json_schema_grammar

    tokenizer = load_tokenizer(model_dir)
    started = time.perf_counter()
    GrammarProcessor(tokenizer, json_schema_grammar({"type": "object"}), 49152)
    view = time.perf_counter() - started
    tools = [t.Tool(f"tool_{i}", f"Does thing number {i} for the user.", {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {
            "type": "integer", "minimum": 1, "maximum": 50}, "mode": {
            "type": "string", "enum": ["fast", "exact"]}},
        "required": ["query", "mode"], "additionalProperties": False}) for i in range(10)]
    compile_s = []
    for _ in range(5):
        started = time.perf_counter()
        GrammarProcessor(tokenizer, json_schema_grammar(
            t.output_schema(tools, t.ToolChoice())), 49152).allowed()
        compile_s.append(time.perf_counter() - started)
    ask = [{"role": "user", "content": "Find me a bike."}]
    plain = len(tokenizer.apply_chat_template(ask, add_generation_prompt=True))
    overhead = {n: len(tokenizer.apply_chat_template(t.with_tools(ask, tools[:n]),
                                                     add_generation_prompt=True)) - plain
                for n in (1, 10)}
    return {"tokenizer_view_s": view, "compile_10_tools_s": statistics.median(compile_s),
            "prompt_overhead_tokens": overhead}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=ROOT / "experiments" / "results" / "bench_serving.json")
    parser.add_argument("--parts", default="abcdef", help="which parts to run")
    args = parser.parse_args()
    model_dir = ROOT / "models" / MODEL
    results: dict = json.loads(args.out.read_text()) if args.out.exists() else {}
    results["blas"] = blas_status().detail
    story = "Write a long story about a lighthouse keeper and a storm."
    if "f" in args.parts:
        results["f_tool_grammar"] = tool_grammar_costs(model_dir)
        print(f"(f) {results['f_tool_grammar']}", flush=True)
    if "e" in args.parts:
        server = ServerProcess(MODEL, cache_dir=tempfile.mkdtemp()).start()
        try:
            results["e_constrained_decode"] = constrained_decode(server.url, story)
        finally:
            server.stop()
        e = results["e_constrained_decode"]
        print(f"(e) decode under a JSON schema {e['constrained_tps']:.1f} tok/s vs free "
              f"{e['free_tps']:.1f} tok/s: {e['ratio']:.2f}", flush=True)
    if not set("abcd") & set(args.parts):
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        return

    server = ServerProcess(MODEL, cache_dir=tempfile.mkdtemp()).start()
    try:
        url = server.url
        stream_turn(url, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        ratios, ours_tps, reference_tps = [], [], []
        for repetition in range(SINGLE_REPETITIONS):  # alternating which runs first
            runs = [lambda r=repetition: stream_turn(
                        url, [{"role": "user", "content": story}], 128, agent=f"bench-{r}"),
                    lambda: mlx_generate_tps(model_dir, story, 128)]
            if repetition % 2:
                runs.reverse()
            first, second = (run() for run in runs)
            single, reference = (first, second) if repetition % 2 == 0 else (second, first)
            ours_tps.append(single["decode_tps"])
            reference_tps.append(reference)
            ratios.append(single["decode_tps"] / reference)
            print(f"(a) repetition {repetition + 1}: ours {single['decode_tps']:.2f} tok/s, "
                  f"mlx_lm.generate {reference:.2f} tok/s ({ratios[-1]:.3f})", flush=True)
        results["a_single_stream"] = {"ours_tps": statistics.median(ours_tps),
                                      "mlx_generate_tps": statistics.median(reference_tps),
                                      "ratio": statistics.median(ratios),
                                      "ratios": ratios, "ours_all": ours_tps,
                                      "mlx_generate_all": reference_tps}
        print(f"(a) decode: ours {statistics.median(ours_tps):.1f} tok/s, mlx_lm.generate "
              f"{statistics.median(reference_tps):.1f} tok/s, median ratio "
              f"{results['a_single_stream']['ratio']:.3f}", flush=True)
        if not set("bcd") & set(args.parts):
            args.out.write_text(json.dumps(results, indent=2))
            print(f"wrote {args.out}")
            return

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            started = time.perf_counter()
            runs = list(pool.map(lambda i: stream_turn(
                url, [{"role": "user", "content": f"{story} Version {i}."}], 64,
                agent=f"bench-many-{i}"), range(8)))
            wall = time.perf_counter() - started
        aggregate = sum(r["tokens"] for r in runs) / wall
        one = single["tokens"] / single["total"]
        results["b_concurrency"] = {"agents": 8, "aggregate_tps": aggregate, "single_tps": one,
                                    "ratio": aggregate / one}
        print(f"(b) 8 agents: {aggregate:.1f} tok/s aggregate vs {one:.1f} single "
              f"({aggregate / one:.1f}x)", flush=True)

        long_history = [{"role": "user", "content": SHARED_PREFIX * 2 + " Summarise."}]
        first = stream_turn(url, long_history, 8, agent="bench-history")
        turn = [*long_history, {"role": "assistant", "content": "Noted."},
                {"role": "user", "content": "Which bikes do you sell?"}]
        warm = stream_turn(url, turn, 8, agent="bench-history")
        cold = stream_turn(url, turn, 8, agent="bench-history-cold")
        results["c_cached_history"] = {"history_tokens": warm["cached"],
                                       "ttft_warm": warm["ttft"], "ttft_cold": cold["ttft"],
                                       "ratio": warm["ttft"] / cold["ttft"],
                                       "first_turn_ttft": first["ttft"]}
        print(f"(c) {warm['cached']} cached tokens: TTFT {warm['ttft']:.3f} s warm vs "
              f"{cold['ttft']:.3f} s cold (1/{cold['ttft'] / warm['ttft']:.0f})", flush=True)

        ours = shared_prefix_workload(url, None)
    finally:
        server.stop()

    with tempfile.TemporaryDirectory() as tmp:
        peer = MlxLmServer(float32_copy(model_dir, Path(tmp) / "smollm2-f32")).start()
        try:
            stream_turn(peer.url, [{"role": "user", "content": "Hello"}], 4,
                        model=str(peer.model_dir))
            theirs = shared_prefix_workload(peer.url, str(peer.model_dir))
        finally:
            peer.stop()
    results["d_shared_prefix"] = {
        "requests": 20, "ours_mean_s": statistics.mean(ours),
        "mlx_lm_server_mean_s": statistics.mean(theirs),
        "ratio": statistics.mean(ours) / statistics.mean(theirs),
        "ours_s": ours, "mlx_lm_server_s": theirs}
    print(f"(d) shared prefix, 20 requests: ours {statistics.mean(ours):.3f} s/request, "
          f"mlx_lm.server {statistics.mean(theirs):.3f} s/request", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
