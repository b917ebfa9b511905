"""EXP-017: two models by request, a planner agent on one model and four sub-agents on the
other taking turns like a coding agent with sub-agents; ours beside mlx_lm.server, in one run.

A planner agent on SmolLM2 (the chat model) and four sub-agents on Gemma take turns in
rounds: the planner's turn, then each sub-agent's turn, R rounds (default 8). Every agent
starts with a distinct context of 300-600 tokens, and each turn appends its reply and a
short follow-up, so every history grows. Every turn is streamed, greedy, 16 tokens (4 in
a quick run), and names its model in the request's ``model`` field.

Servers in one run, on the same weights (float32 copies of the imported models, the files
every server loads). All are started and warmed first (one tiny request to each model:
both tokenizers built, files in the page cache); then each round runs on one server after
the other, in an order rotated every round, so no two turns ever overlap and a slow
stretch of the shared machine falls on every server alike. A server's time is the sum of
its own rounds:
- ``single``: the baseline, the same turns on single-model runs of our server: the
  planner's turns on a server of SmolLM2 alone, the sub-agents' on a server of Gemma
  alone, their wall times added. Every turn runs on its own model as in the two-model
  runs; only the second model is missing. (All turns on one model would change the cost
  of half the turns, and so measure the models rather than the second model's cost.)
- ``ours_both``: load on demand, a memory budget that holds both models;
- ``ours_one``: load on demand, a memory budget that holds one model but not both, so
  every switch swaps: the leaving model's agents go to disk and come back on its next
  turn. The minimum residency is 0 s: turns alternate one at a time, so there is no flip
  to damp, and the default 10 s would hold every switch for the rest of those 10 s;
- ``ours_one_residency10``: the same with the default minimum residency, 10 s;
- ``mlx_lm``: mlx_lm.server switching in process on the ``model`` field (it keeps one
  model, reloads model and tokenizer on every switch, and keeps its prompt cache of 10
  entries in RAM across switches);
- ``mlx_lm_restart``: mlx_lm.server restarted for the other model on every switch (what a
  llama-swap style swapper does with a backend); every cache is lost, and the restart
  counts in the TTFT of the turn that waited for it.

Every server, ours included, loads the float32 copies. On the imported directories no budget
holds one of these two models but not both: the preflight counts a quantized model's
weights as if all had the default bit width, so Gemma (its embedding table, 63% of its
weights, is 8-bit) counts 2.48 GB to load, more than SmolLM2's count (0.93 GB) beside
Gemma's float32 weights (1.07 GB). On float32 files its count is the file plus a tenth.

Budgets come from the preflight's own count (``estimated_bytes``: the float32 weights, a
tenth more for the warm-up) and each model's weights: both = the two loads' needs added;
one = halfway between the larger need and the smaller need-beside-the-other.

Per server: turns per minute over the timed turns, median and p95 TTFT per agent turn,
swaps performed (ours: /admin/swaps; mlx_lm.server: model switches; restart: restarts),
and the agents warm on each return (cached_tokens >= 90% of the agent's previous prompt).
Targets: ours_both at least 0.9x single's turns per minute; ours_one every agent warm on
every return, and ahead of every peer on turns per minute.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from experiments.harness import GEMMA, ROOT, SMOLLM2, arguments, history, write_results
from experiments.peers import MlxLmServer, float32_copy, stream_turn
from semantic_server.swap.orchestrator import estimated_bytes
from tests.servers import ServerProcess

KEY = "exp017-key"
SUB_AGENTS = 4
SERVERS = ("single", "ours_both", "ours_one", "ours_one_residency10", "mlx_lm",
           "mlx_lm_restart")
FOLLOW_UPS = ("What is the next step?", "Check the second box and report.",
              "Which family comes next?", "Anything to add?", "Go on with the plan.")


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Ours:
    """Our server with load on demand; the swaps it performed come from /admin/swaps, read
    after every turn (its history keeps the last 20)."""

    def __init__(self, name: str, models_dir: Path, model: str, max_tokens: int,
                 **settings: str) -> None:
        self.name = name
        self.settings = {"models_dir": str(models_dir), "admin_key": KEY,
                         "lora_max_rank": "0",  # no adapters in this workload, as the peer
                         "cache_dir": tempfile.mkdtemp(prefix="exp017-caches-"), **settings}
        self.model = model
        self.max_tokens = max_tokens
        self.process: ServerProcess | None = None
        self.seen: list[dict[str, Any]] = []
        self.timed_from = 0

    @property
    def url(self) -> str:
        assert self.process is not None
        return self.process.url

    def start(self) -> None:
        self.process = ServerProcess(self.model, **self.settings).start()

    def turn(self, agent: str | None, model: str, messages: list[dict]) -> dict[str, Any]:
        result = stream_turn(self.url, messages, self.max_tokens, agent=agent, model=model)
        history = httpx.get(f"{self.url}/admin/swaps", headers={"X-Admin-Key": KEY},
                            timeout=30).json()["data"]
        known = {json.dumps(s, sort_keys=True) for s in self.seen[-len(history):]}
        self.seen += [s for s in history if json.dumps(s, sort_keys=True) not in known]
        result["resident"] = httpx.get(f"{self.url}/health", timeout=30).json()["resident"]
        return result

    def start_timing(self) -> None:
        self.timed_from = len(self.seen)

    def swaps(self) -> dict[str, Any]:
        timed = self.seen[self.timed_from:]
        return {"count": len(timed), "kinds": dict(Counter(s["kind"] for s in timed)),
                "failed": sum(s["status"] != "success" for s in timed),
                "log": [{"kind": s["kind"], "old": s["old_model_id"], "new": s["new_model_id"],
                         "mode": s["mode"], "status": s["status"],
                         "seconds": round(s["duration_ms"] / 1e3, 3),
                         "evicted_agents": s["evicted_agents"]} for s in timed],
                "before_timing": [s["kind"] for s in self.seen[:self.timed_from]]}

    def logs(self) -> list[str]:
        return [str(self.process.log_path)] if self.process else []

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class Peer:
    """mlx_lm.server, switching in process on the ``model`` field or restarted per switch."""

    def __init__(self, name: str, dirs: dict[str, Path], model: str, max_tokens: int,
                 restart: bool) -> None:
        self.name = name
        self.dirs = dirs
        self.model = model
        self.max_tokens = max_tokens
        self.restart = restart
        self.server: MlxLmServer | None = None
        self.switches: list[dict[str, Any]] = []
        self.all_logs: list[str] = []
        self.timed_from = 0

    def start(self) -> None:
        self.server = MlxLmServer(self.dirs[self.model]).start()
        self.all_logs.append(str(self.server.log_path))

    def turn(self, agent: str | None, model: str, messages: list[dict]) -> dict[str, Any]:
        assert self.server is not None
        held = 0.0
        if model != self.model:
            self.model = model
            if self.restart:  # a llama-swap style proxy holds the request meanwhile
                started = time.perf_counter()
                self.server.stop()
                self.start()
                held = time.perf_counter() - started
            self.switches.append({"to": model, **({"restart_seconds": round(held, 3)}
                                                  if self.restart else {})})
        result = stream_turn(self.server.url, messages, self.max_tokens, agent=agent,
                             model=str(self.dirs[model]))
        result["ttft"] += held
        result["total"] += held
        return result

    def start_timing(self) -> None:
        self.timed_from = len(self.switches)

    def swaps(self) -> dict[str, Any]:
        timed = self.switches[self.timed_from:]
        return {"count": len(timed),
                "kinds": {"restart" if self.restart else "in_process_switch": len(timed)},
                "failed": 0, "log": timed}

    def logs(self) -> list[str]:
        return self.all_logs

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class Single:
    """The baseline: each model's turns on a server of that model alone (no load on
    demand, nothing else resident)."""

    def __init__(self, models_dir: Path, models: tuple[str, ...], max_tokens: int) -> None:
        self.name = "single"
        self.parts = {m: Ours(f"single_{m}", models_dir, m, max_tokens) for m in models}

    def start(self) -> None:
        for part in self.parts.values():
            part.start()

    def warm_up(self) -> None:
        for model, part in self.parts.items():
            part.turn(None, model, [{"role": "user", "content": "Hello"}])

    def turn(self, agent: str | None, model: str, messages: list[dict]) -> dict[str, Any]:
        return self.parts[model].turn(agent, model, messages)

    def start_timing(self) -> None:
        for part in self.parts.values():
            part.start_timing()

    def swaps(self) -> dict[str, Any]:
        each = [part.swaps() for part in self.parts.values()]
        return {"count": sum(s["count"] for s in each), "failed": sum(s["failed"] for s in each),
                "kinds": dict(sum((Counter(s["kinds"]) for s in each), Counter())), "log": []}

    def logs(self) -> list[str]:
        return [log for part in self.parts.values() for log in part.logs()]

    def stop(self) -> None:
        for part in self.parts.values():
            part.stop()


def warm_up(server: Ours | Peer | Single, models: tuple[str, str]) -> None:
    """One tiny anonymous request to each model, the planner's model last (it serves
    when the timed turns begin)."""
    if isinstance(server, Single):
        server.warm_up()
        return
    for model in models:
        server.turn(None, model, [{"role": "user", "content": "Hello"}])


def conversations(quick: bool) -> dict[str, list[dict[str, str]]]:
    """Each agent's opening messages: a distinct context of 300-600 tokens (60-120 quick)."""
    low, high = (60, 120) if quick else (300, 600)
    sizes = [high] + [low + (high - low) * k // SUB_AGENTS for k in range(SUB_AGENTS)]
    roles = ["planner"] + [f"sub-{k + 1}" for k in range(SUB_AGENTS)]
    return {role: [{"role": "system", "content": f"You are the {role} of a team sorting an "
                    "archive."},
                   {"role": "user", "content": history(i, size) + " What do you see?"}]
            for i, (role, size) in enumerate(zip(roles, sizes, strict=True))}


def run_round(server: Ours | Peer | Single, round_: int, agents: list[tuple[str, str]],
              messages: dict[str, list[dict[str, str]]], rows: list[dict[str, Any]],
              clock: float) -> float:
    """One round of ``server``'s turns (the planner's, then each sub-agent's), appended to
    ``rows``; returns how long it took."""
    begin = time.perf_counter()
    for agent, model in agents:
        r = server.turn(agent, model, messages[agent])
        messages[agent] += [{"role": "assistant", "content": r["text"]},
                            {"role": "user", "content": FOLLOW_UPS[round_ % len(FOLLOW_UPS)]}]
        rows.append({"round": round_, "agent": agent, "model": model,
                     "at": round(clock + time.perf_counter() - begin, 3),
                     **{k: r[k] for k in ("ttft", "total", "prompt", "cached", "tokens")},
                     **({"resident": r["resident"]} if "resident" in r else {})})
        print(f"  {server.name:20s} round {round_} {agent:8s} prompt {r['prompt']:5d} "
              f"cached {r['cached']:5d} TTFT {r['ttft']:7.3f} s", flush=True)
    return time.perf_counter() - begin


def summarise(wall: float, rows: list[dict[str, Any]], swaps: dict[str, Any]) -> dict[str, Any]:
    previous: dict[str, int] = {}
    warm_by_round: Counter[int] = Counter()
    returns_by_round: Counter[int] = Counter()
    for row in rows:
        if row["agent"] in previous:
            row["warm"] = row["cached"] >= 0.9 * previous[row["agent"]]
            returns_by_round[row["round"]] += 1
            warm_by_round[row["round"]] += row["warm"]
        previous[row["agent"]] = row["prompt"]
    ttfts = [r["ttft"] for r in rows]
    back = [r["ttft"] for r in rows if "warm" in r]
    return {
        "turns": len(rows), "wall_seconds": wall, "turns_per_minute": len(rows) / wall * 60,
        "median_ttft": statistics.median(ttfts), "p95_ttft": p95(ttfts),
        "median_ttft_returns": statistics.median(back) if back else None,
        "p95_ttft_returns": p95(back) if back else None,
        "generated_tokens": sum(r["tokens"] for r in rows),
        "swaps": swaps["count"], "swap_kinds": swaps["kinds"], "swaps_failed": swaps["failed"],
        "warm_returns": sum(warm_by_round.values()), "returns": sum(returns_by_round.values()),
        "warm_by_round": [[r, warm_by_round[r], returns_by_round[r]]
                          for r in sorted(returns_by_round)],
    }


def budgets(dirs: dict[str, Path], planner: str, sub: str) -> dict[str, int]:
    """Memory budgets for both models and for one, from the preflight's own count."""
    need = {m: estimated_bytes(dirs[m], json.loads((dirs[m] / "config.json").read_text()), 4)
            for m in (planner, sub)}
    weights = {m: sum(f.stat().st_size for f in dirs[m].glob("*.safetensors"))
               for m in (planner, sub)}
    beside = min(need[planner] + weights[sub], need[sub] + weights[planner])
    alone = max(need.values())
    if alone >= beside:
        raise SystemExit(f"no budget holds one model but not both: {need}, {weights}")
    return {"need_planner_model": need[planner], "need_sub_model": need[sub],
            "weights_planner_model": weights[planner], "weights_sub_model": weights[sub],
            "one": (alone + beside) // 2, "one_lower": alone, "one_upper": beside - 1,
            "both": need[planner] + need[sub]}


def prepare_models(quick: bool, tmp: Path) -> tuple[str, dict[str, Path]]:
    """The sub-agents' model id and every model's float32 directory (all servers load
    these). ``torch_dtype`` records the files' dtype for our preflight (mlx_lm ignores it).
    A quick run is a smoke test: its sub-agents' model is SmolLM2 under another name."""
    sub = f"{SMOLLM2}-sub" if quick else GEMMA
    dirs = {}
    for model in (SMOLLM2,) if quick else (SMOLLM2, GEMMA):
        dirs[model] = float32_copy(ROOT / "models" / model, tmp / model)
        config = json.loads((dirs[model] / "config.json").read_text())
        (dirs[model] / "config.json").write_text(json.dumps({**config,
                                                             "torch_dtype": "float32"}))
    if quick:
        (tmp / sub).symlink_to(dirs[SMOLLM2])
        dirs[sub] = tmp / sub
    return sub, dirs


def targets(servers: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    single, both, one = (servers.get(n, {}).get("summary") for n in
                         ("single", "ours_both", "ours_one"))
    if single and both:
        ratio = both["turns_per_minute"] / single["turns_per_minute"]
        found["ours_both_over_single"] = ratio
        found["ours_both_at_least_0_9x_single"] = ratio >= 0.9
    if one:
        found["ours_one_every_return_warm"] = one["warm_returns"] == one["returns"]
        peers = {n: s["summary"]["turns_per_minute"] for n, s in servers.items()
                 if n.startswith("mlx_lm")}
        if peers:
            found["ours_one_over_peers"] = {n: one["turns_per_minute"] / tpm
                                            for n, tpm in peers.items()}
            found["ours_one_ahead_of_every_peer"] = all(
                one["turns_per_minute"] > tpm for tpm in peers.values())
    return found


def plot(results: dict[str, Any], path: Path) -> None:
    servers = results["servers"]
    names = list(servers)
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    left.bar(names, [servers[n]["summary"]["turns_per_minute"] for n in names],
             color=[colours[n] for n in names])
    if "single" in servers:
        left.axhline(0.9 * servers["single"]["summary"]["turns_per_minute"], color="grey",
                     linestyle=":", label="0.9x single")
        left.legend(fontsize=8)
    left.set_ylabel("agent turns per minute")
    left.tick_params(axis="x", labelrotation=25, labelsize=8)
    left.set_title("Throughput")
    for n in names:
        rows = servers[n]["turns"]
        middle.plot(range(1, len(rows) + 1), [r["ttft"] for r in rows], marker=".", lw=1,
                    label=n, color=colours[n])
        warm = servers[n]["summary"]["warm_by_round"]
        right.plot([w[0] + 1 for w in warm], [w[1] for w in warm], marker="o", label=n,
                   color=colours[n])
    middle.set_yscale("log")
    middle.set_xlabel("agent turn (planner, then sub-agents 1-4, each round)")
    middle.set_ylabel("TTFT, s (log)")
    middle.set_title("TTFT per turn")
    middle.legend(fontsize=7)
    middle.grid(alpha=0.3)
    right.axhline(1 + SUB_AGENTS, color="grey", linestyle=":", label="all agents")
    right.set_xlabel("round")
    right.set_ylabel("agents warm on their return")
    right.set_title("Warm returns")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(f"EXP-017: a planner on SmolLM2 and {SUB_AGENTS} sub-agents on "
                 f"{results['sub_model']}, {results['rounds']} rounds, models by request")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict[str, Any]) -> str:
    lines = ["| server | turns/min | median / p95 TTFT per turn | swaps | warm on return |",
             "|---|---:|---:|---:|---:|"]
    for name, data in results["servers"].items():
        s = data["summary"]
        lines.append(f"| {name} | {s['turns_per_minute']:.1f} | {s['median_ttft']:.2f} / "
                     f"{s['p95_ttft']:.2f} s | {s['swaps']} | "
                     f"{s['warm_returns']}/{s['returns']} |")
    return "\n".join(lines)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, help="rounds of turns (default 8; 2 quick)")
    parser.add_argument("--servers", help=f"comma-separated subset of {','.join(SERVERS)} "
                        "(default all)")
    parser.add_argument("--table", type=Path, help="only print the table of a results JSON")


def main() -> None:
    args = arguments(__doc__.splitlines()[0], options)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    rounds = args.rounds or (2 if args.quick else 8)
    max_tokens = 4 if args.quick else 16
    names = args.servers.split(",") if args.servers else list(SERVERS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="exp017-f32-") as tmp:
        sub, dirs = prepare_models(args.quick, Path(tmp))
        budget = budgets(dirs, SMOLLM2, sub)
        print(f"budgets: {json.dumps(budget)}", flush=True)
        agents = [("planner", SMOLLM2)] + [(f"sub-{k + 1}", sub) for k in range(SUB_AGENTS)]
        on_demand = {"load_on_demand": "true", "min_residency_seconds": "0"}
        one = str(budget["one"])
        make = {
            "single": lambda: Single(Path(tmp), (SMOLLM2, sub), max_tokens),
            "ours_both": lambda: Ours("ours_both", Path(tmp), SMOLLM2, max_tokens, **on_demand,
                                      memory_budget_bytes=str(budget["both"])),
            "ours_one": lambda: Ours("ours_one", Path(tmp), SMOLLM2, max_tokens, **on_demand,
                                     memory_budget_bytes=one),
            "ours_one_residency10": lambda: Ours(
                "ours_one_residency10", Path(tmp), SMOLLM2, max_tokens, load_on_demand="true",
                min_residency_seconds="10", memory_budget_bytes=one),
            "mlx_lm": lambda: Peer("mlx_lm", dirs, SMOLLM2, max_tokens, restart=False),
            "mlx_lm_restart": lambda: Peer("mlx_lm_restart", dirs, SMOLLM2, max_tokens,
                                           restart=True),
        }
        servers = {name: make[name]() for name in names}
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        seconds = dict.fromkeys(names, 0.0)
        messages = {name: conversations(args.quick) for name in names}
        try:
            for name, server in servers.items():
                print(f"starting {name}", flush=True)
                server.start()
                warm_up(server, (sub, SMOLLM2))
                server.start_timing()
            for round_ in range(rounds):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    seconds[name] += run_round(servers[name], round_, agents, messages[name],
                                               rows[name], seconds[name])
            swaps = {name: server.swaps() for name, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    results: dict[str, Any] = {
        "rounds": rounds, "sub_agents": SUB_AGENTS, "max_tokens": max_tokens,
        "planner_model": SMOLLM2, "sub_model": sub, "quick": args.quick, "budgets": budget,
        "servers": {name: {"wall_seconds": seconds[name], "turns": rows[name],
                           "swaps": swaps[name], "logs": servers[name].logs(),
                           "summary": summarise(seconds[name], rows[name], swaps[name])}
                    for name in names}}
    results["targets"] = targets(results["servers"])
    results["wall_seconds_total"] = time.perf_counter() - started
    name = "exp017_models_by_request" + ("_quick" if args.quick else "")
    out = write_results(name, results, args.results)
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    main()
