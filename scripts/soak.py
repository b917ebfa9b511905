"""Soak test (not a test): N agents talk for M minutes while the model swaps every few seconds.

Each agent keeps one conversation per model and sends its next turn as soon as the last one
ends (streamed, greedy, a few tokens, no model named so it runs on whatever is loaded). A
swap alternates SmolLM2 and Gemma every ``--swap-every`` seconds through the admin API.
Prints requests ok / failed, p50 / p99 latency outside and during swaps, the wait of held
requests, and caches lost: a turn on a model whose cached_tokens do not cover the agent's
previous turn on that model. Writes JSON.

Usage: .venv/bin/python scripts/soak.py [--agents 8] [--minutes 10] [--swap-every 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import ServerProcess  # noqa: E402

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
KEY = "soak-key"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else \
        (values[0] if values else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--swap-every", type=float, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" /
                        "soak.json")
    args = parser.parse_args()
    server = ServerProcess(MODELS[0], admin_key=KEY).start()
    deadline = time.monotonic() + args.minutes * 60
    swaps: list[tuple[float, float, str]] = []  # (start, end, status)
    requests: list[dict] = []
    lock = threading.Lock()

    def agent(i: int) -> None:
        history: dict[str, tuple[list[dict], int]] = {}
        turn = 0
        while time.monotonic() < deadline:
            turn += 1
            started = time.monotonic()
            record = {"agent": i, "start": started}
            try:
                health_model = server.health().get("model")
                messages, covered = history.get(health_model, ([], 0))
                messages = [*messages, {"role": "user", "content":
                                        f"Agent {i}, turn {turn}: name one animal."}]
                response = httpx.post(f"{server.url}/v1/chat/completions", timeout=600,
                                      headers={"X-Agent-ID": f"soak-agent-{i}"},
                                      json={"messages": messages, "max_tokens": 6,
                                            "temperature": 0})
                record["status"] = response.status_code
                if response.status_code == 200:
                    body = response.json()
                    model = body["model"]
                    usage = body["usage"]
                    cached = usage["prompt_tokens_details"]["cached_tokens"]
                    # A swap between the health check and the request means this
                    # conversation ran on the other model: the agent's cache for that model
                    # now holds it, so it becomes that model's conversation from here on.
                    if covered and model == health_model:
                        record.update(model=model, cached=cached, covered=covered,
                                      cache_lost=cached < covered - 4)
                    messages.append({"role": "assistant",
                                     "content": body["choices"][0]["message"]["content"]})
                    history[model] = (messages[-12:] if len(messages) > 12 else messages,
                                      0 if len(messages) > 12 else
                                      usage["prompt_tokens"] + usage["completion_tokens"])
            except httpx.HTTPError as exc:
                record["status"] = -1
                record["error"] = str(exc)
            finally:
                record["seconds"] = time.monotonic() - started
                with lock:
                    requests.append(record)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(args.agents)]
    for thread in threads:
        thread.start()
    target = 1
    try:
        while time.monotonic() + args.swap_every < deadline:
            time.sleep(args.swap_every)  # the swap cadence is the workload, not a race fix
            started = time.monotonic()
            response = httpx.post(f"{server.url}/admin/models/swap", timeout=600,
                                  headers={"X-Admin-Key": KEY},
                                  json={"model_id": MODELS[target]})
            swaps.append((started, time.monotonic(), response.json().get("status", "error")))
            print(f"swap to {MODELS[target]}: {swaps[-1][2]} in "
                  f"{swaps[-1][1] - swaps[-1][0]:.1f} s; {len(requests)} requests so far",
                  flush=True)
            target = 1 - target
        for thread in threads:
            thread.join()
    finally:
        server.stop()

    def during_swap(r: dict) -> bool:
        end = r["start"] + r["seconds"]
        return any(r["start"] < s_end and end > s_start for s_start, s_end, _ in swaps)

    ok = [r for r in requests if r["status"] == 200]
    failed = [r for r in requests if r["status"] != 200]
    outside = [r["seconds"] for r in ok if not during_swap(r)]
    inside = [r["seconds"] for r in ok if during_swap(r)]
    lost = [r for r in ok if r.get("cache_lost")]
    summary = {
        "agents": args.agents, "minutes": args.minutes, "swap_every_s": args.swap_every,
        "swaps": len(swaps), "swaps_ok": sum(s[2] == "success" for s in swaps),
        "requests_ok": len(ok), "requests_failed": len(failed),
        "p50_outside_s": percentile(outside, 50), "p99_outside_s": percentile(outside, 99),
        "p50_during_swap_s": percentile(inside, 50), "p99_during_swap_s": percentile(inside, 99),
        "swap_seconds_median": statistics.median([e - s for s, e, _ in swaps]) if swaps else 0,
        "caches_lost": len(lost), "lost": lost[:20], "failures": failed[:10],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    for key, value in summary.items():
        if key not in ("failures", "lost"):
            print(f"{key:22s} {value:.3f}" if isinstance(value, float) else
                  f"{key:22s} {value}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
