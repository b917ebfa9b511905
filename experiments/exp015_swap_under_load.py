"""EXP-015: swaps under load, the dual path beside the sequential one, in one run.

C clients (default 4) send short streamed requests back to back, each as its own agent,
while the server swaps SmolLM2 -> Gemma -> SmolLM2 three times: with ``mode: dual`` (the
target loads beside the serving model and is promoted) while neither tokenizer has been
built yet in the process (``dual_cold``: a model's first visit), with ``mode: sequential``
(the eight steps: drain, evict, shutdown, unload, load, reconfigure, retag, reinit), and
with ``mode: dual`` again, both tokenizers cached as after any first visit (``dual``, the
like-for-like comparison with ``sequential``). Every token's arrival is timed on the
client.

Per path: requests failed; the p99 latency of requests that overlapped a swap of that path
against requests that overlapped none; the longest time in which no client received a
token while a swap of that path ran, against the longest outside every swap; the promotion
pause measured in the server; and, for the dual path, the peak MLX memory during the load
against the two models' weights together. A PNG timeline shows tokens per second with the
swaps shaded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import SMOLLM2, arguments, away_model, write_results
from tests.servers import ServerProcess

KEY = "exp015-key"
# (label, path) of each round trip, in the order they run
ROUNDS = (("dual_cold", "dual"), ("sequential", "sequential"), ("dual", "dual"))
QUESTIONS = ("Name a river.", "Say hello.", "Count to five.", "Name a colour.")


@dataclass
class Request:
    client: int
    started: float
    ended: float = 0.0
    tokens: list[float] = field(default_factory=list)  # arrival time of each content chunk
    status: int = 0
    model: str = ""
    error: str = ""


@dataclass
class Swap:
    label: str
    mode: str
    target: str
    started: float
    ended: float
    body: dict[str, Any]


def client_loop(url: str, client: int, max_tokens: int, stop: threading.Event,
                requests: list[Request]) -> None:
    """Streamed requests back to back until ``stop``; each chunk's arrival is recorded."""
    with httpx.Client(timeout=600) as http:
        turn = 0
        while not stop.is_set():
            request = Request(client, time.perf_counter())
            body = {"messages": [{"role": "user", "content": QUESTIONS[turn % 4]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True}
            try:
                with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                                 headers={"X-Agent-ID": f"load-{client}"}) as response:
                    request.status = response.status_code
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        data = json.loads(line[6:])
                        request.model = data.get("model", request.model)
                        if data.get("error"):
                            request.error = data["error"].get("message", "error")
                        elif data.get("choices") and data["choices"][0]["delta"].get("content"):
                            request.tokens.append(time.perf_counter())
            except httpx.HTTPError as exc:
                request.error = str(exc)
            request.ended = time.perf_counter()
            requests.append(request)
            turn += 1


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def overlaps(start: float, end: float, swaps: list[Swap]) -> bool:
    return any(start < s.ended and end > s.started for s in swaps)


def longest_gap(arrivals: list[float], start: float, end: float) -> float:
    """The longest time within [start, end] in which no token arrived."""
    inside = [start, *(t for t in arrivals if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(inside))


def gaps_outside(arrivals: list[float], swaps: list[Swap], begin: float, finish: float,
                 ) -> float:
    """The longest token gap in the stretches between swaps (a second of margin each side,
    so a swap's edges count as the swap's)."""
    edges = [begin, *(t for s in sorted(swaps, key=lambda s: s.started)
                      for t in (s.started - 1, s.ended + 1)), finish]
    stretches = [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b > a]
    return max(longest_gap(arrivals, a, b) for a, b in stretches)


def summarise(requests: list[Request], swaps: list[Swap], begin: float,
              finish: float) -> dict[str, Any]:
    arrivals = sorted(t for r in requests for t in r.tokens)
    outside = [r.ended - r.started for r in requests
               if not r.error and not overlaps(r.started, r.ended, swaps)]
    swap_seconds = sum(s.ended - s.started for s in swaps)
    tokens_in_swaps = sum(any(s.started <= t <= s.ended for s in swaps) for t in arrivals)
    report: dict[str, Any] = {
        "requests": len(requests), "outside": {
            "requests": len(outside), "p99_latency_s": p99(outside),
            "median_latency_s": statistics.median(outside) if outside else None,
            "longest_gap_s": gaps_outside(arrivals, swaps, begin, finish),
            "tokens_per_second": (len(arrivals) - tokens_in_swaps)
            / (finish - begin - swap_seconds)}}
    for label, mode in ROUNDS:
        mine = [s for s in swaps if s.label == label]
        during = [r for r in requests if overlaps(r.started, r.ended, mine)]
        latencies = [r.ended - r.started for r in during if not r.error]
        gap = max(longest_gap(arrivals, s.started, s.ended) for s in mine)
        dual_memory = [s.body["memory"] for s in mine if "peak_during_load" in s.body["memory"]]
        report[label] = {
            "swaps": [{"target": s.target, "seconds": s.ended - s.started,
                       "status": s.body["status"], "path": s.body["mode"],
                       "promotion_pause_ms": s.body.get("promotion_pause_ms"),
                       "steps": {t["name"]: round(t["duration_ms"], 2)
                                 for t in s.body["steps"]}} for s in mine],
            "requests_overlapping": len(during),
            "failed": sum(bool(r.error) or r.status != 200 for r in during),
            "p99_latency_s": p99(latencies),
            "p99_ratio": (p99(latencies) / report["outside"]["p99_latency_s"]
                          if latencies and outside else None),
            "longest_gap_s": gap,
            "gap_ratio": gap / report["outside"]["longest_gap_s"],
            "tokens_per_second": sum(any(s.started <= t <= s.ended for s in mine)
                                     for t in arrivals) / sum(s.ended - s.started for s in mine),
            "promotion_pause_ms": max((s.body.get("promotion_pause_ms") or 0.0)
                                      for s in mine) if mode == "dual" else None,
            "peak_memory_over_both_weights": max(
                (m["peak_during_load"] / (m["weights_old"] + m["weights_new"])
                 for m in dual_memory), default=None),
        }
    report["failed_total"] = sum(bool(r.error) or r.status != 200 for r in requests)
    report["request_rows"] = [  # client, start, end, first token (s from the start), tokens
        [r.client, round(r.started - begin, 3), round(r.ended - begin, 3),
         round(r.tokens[0] - begin, 3) if r.tokens else None, len(r.tokens), r.model,
         r.error or r.status] for r in requests]
    return report


def plot(requests: list[Request], swaps: list[Swap], begin: float, path: Any) -> None:
    arrivals = sorted(t - begin for r in requests for t in r.tokens)
    width = 0.5
    bins = int(arrivals[-1] / width) + 1 if arrivals else 1
    counts = [0] * bins
    for t in arrivals:
        counts[int(t / width)] += 1
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot([i * width for i in range(bins)], [c / width for c in counts], lw=1, color="black",
            label="tokens/s, all clients")
    colours = {"dual_cold": "tab:olive", "dual": "tab:green", "sequential": "tab:red"}
    for swap in swaps:
        ax.axvspan(swap.started - begin, swap.ended - begin, color=colours[swap.label],
                   alpha=0.25, label=f"{swap.label} swap")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper right")
    ax.set_xlabel("seconds")
    ax.set_ylabel("tokens per second")
    ax.set_title("EXP-015: streamed tokens through swaps (dual with cold tokenizers, "
                 "sequential, dual)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    def more(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clients", type=int, default=4)
        parser.add_argument("--max-tokens", type=int, default=16)
        parser.add_argument("--settle", type=float, default=10.0,
                            help="seconds of plain load before, between and after swaps")

    args = arguments(__doc__.splitlines()[0], more)
    settle = 6.0 if args.quick else args.settle
    away, extra = away_model(args.quick)
    settings = {"admin_key": KEY, "max_batch": str(max(8, args.clients))}
    if extra:
        settings["extra_models"] = json.dumps(extra["extra_models"])
    server = ServerProcess(SMOLLM2, **settings).start()
    requests: list[Request] = []
    swaps: list[Swap] = []
    stop = threading.Event()
    try:
        threads = [threading.Thread(target=client_loop, daemon=True, args=(
            server.url, i, args.max_tokens, stop, requests)) for i in range(args.clients)]
        begin = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(settle)  # steady load before the first swap
        for label, mode in ROUNDS:
            for target in (away, SMOLLM2):
                started = time.perf_counter()
                response = httpx.post(f"{server.url}/admin/models/swap", timeout=900,
                                      headers={"X-Admin-Key": KEY},
                                      json={"model_id": target, "mode": mode})
                swaps.append(Swap(label, mode, target, started, time.perf_counter(),
                                  response.json()))
                body = response.json()
                print(f"{label:10s} -> {target:24s} {swaps[-1].ended - started:6.2f} s "
                      f"{body['status']} (path {body['mode']}); steps "
                      + ", ".join(f"{t['name']} {t['duration_ms']:.0f}" for t in body["steps"]),
                      flush=True)
                time.sleep(settle)
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
        finish = time.perf_counter()
    finally:
        stop.set()
        server.stop()
    report = summarise(requests, swaps, begin, finish)
    targets = {"failed": 0, "dual_p99_ratio_at_most": 1.5, "dual_gap_ratio_at_most": 2.0,
               "promotion_pause_ms_under": 10.0}
    data = {"clients": args.clients, "max_tokens": args.max_tokens, "away": away,
            "quick": args.quick, "targets": targets, **report}
    out = write_results("exp015_swap_under_load", data, args.results)
    plot(requests, swaps, begin, out.with_suffix(".png"))
    outside = report["outside"]
    print(f"outside swaps: {outside['requests']} requests, p99 {_f(outside['p99_latency_s'])} s, "
          f"longest gap {_f(outside['longest_gap_s'])} s, "
          f"{_f(outside['tokens_per_second'])} tokens/s")
    for label, _ in ROUNDS:
        row = report[label]
        print(f"{label:10s}: {row['requests_overlapping']} requests overlapped, {row['failed']} "
              f"failed, p99 {_f(row['p99_latency_s'])} s ({_f(row['p99_ratio'])}x), longest "
              f"gap {_f(row['longest_gap_s'])} s ({_f(row['gap_ratio'])}x), "
              f"{_f(row['tokens_per_second'])} tokens/s, promotion pause "
              f"{_f(row['promotion_pause_ms'], 4)} ms, peak memory / both weights "
              f"{_f(row['peak_memory_over_both_weights'])}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
