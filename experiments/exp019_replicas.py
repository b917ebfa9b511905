"""EXP-019 (replicas): two servers sharing agents' caches through Redis behind nginx, one
killed with ``kill -9`` between two turns, and what the write-back at each turn's end costs.

Real processes on loopback: ``redis-server``, two SmolLM2 replicas with
``SEMANTIC_CACHE_STORE=redis://``, and nginx spreading agents by consistent hashing of
``X-Agent-ID`` (``deploy/nginx.conf.template``, plus one response header naming the replica,
so the agents can be picked half on each: the hash depends on the replicas' random ports).
Every turn is streamed, greedy, 8 tokens, one at a time.

1. **Failover.** N agents (default 16) each send about T tokens of distinct history (default
   1,000) through nginx: turn 1 builds their caches, half on each replica. The first replica
   is killed with SIGKILL, then every agent sends turn 2 through nginx. An agent is warm when
   at least 90% of its turn-1 prompt came from a cache. Target: N/N warm.
2. **Against a local restore and a cold prefill.** A third server, with the default file
   store and behind its own nginx, takes the failed-over agents' turn 1 (the same messages)
   beside the replicas, and restarts before the kill (its shutdown writes every hot cache to
   its folder). After the kill, each failed-over agent's turn 2 runs three ways, in rotating
   order: on the surviving replica (restored from Redis), on the file server (restored from
   its own folder), and on the file server for a new agent id whose first words differ (a
   cold prefill: no hot cache shares 48 tokens with it, so no other agent's prefix seeds it;
   checked). Target: failover TTFT at most 1.5x the local restore.
3. **Redis memory.** ``INFO memory`` used_memory over its value before the replicas
   started, against the bytes of the agents' cache files in the replicas' folders.
4. **The write policy's cost.** With Redis, a turn's end writes the whole grown cache to
   the folder and to Redis before the turn's last byte; with the file store it writes
   nothing (a cache reaches the disk only when evicted, written behind). The failed-over
   agents take W more turns (default 3) on the surviving replica (Redis) and on the
   file-store server, alternating, direct (no nginx): the added end-to-end latency per turn
   and per MB of cache file, and its parts measured alone (a file write with fsync, the
   file read back, a Redis SET of it).
"""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import SMOLLM2, arguments, history, write_results
from semantic_server.cache.cache_file import agent_file_name, write_atomically
from tests.servers import NginxProcess, RedisProcess, ServerProcess

TOKENS_OUT = 8
WARM = 0.9  # share of the previous prompt that must come from a cache
SEEDING = 48  # MIN_SHARED_PREFIX: a cold turn must reuse fewer tokens than this
UPSTREAM = "X-Upstream"
MB = 1e6


class TracedNginx(NginxProcess):
    """The deployment's nginx configuration with one more response header: the replica
    that served the request (``$upstream_addr``), so this script can see the routing."""

    def __init__(self, upstreams: list[str]) -> None:
        text = NginxProcess.TEMPLATE.read_text()
        marker = "proxy_buffering off;"
        assert marker in text, "deploy/nginx.conf.template changed"
        self.TEMPLATE = Path(tempfile.mkdtemp(prefix="exp019-nginx-")) / "nginx.conf.template"
        self.TEMPLATE.write_text(text.replace(
            marker, f"{marker}\n            add_header {UPSTREAM} $upstream_addr always;", 1))
        super().__init__(upstreams)

    def replica_of(self, agent: str) -> str:
        response = httpx.get(f"{self.url}/health", headers={"X-Agent-ID": agent}, timeout=30)
        response.raise_for_status()
        return "http://" + response.headers[UPSTREAM]


def first_turn(number: int, tokens: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": history(number, tokens) + "\nSummarise these notes."}]


def next_turn(messages: list[dict[str, str]], reply: str, turn: int) -> list[dict[str, str]]:
    asks = ["Now list three details from them.", "Which year comes up most?",
            "Name one family and its ship.", "What else is in the boxes?"]
    return [*messages, {"role": "assistant", "content": reply},
            {"role": "user", "content": asks[(turn - 2) % len(asks)]}]


def turn(url: str, messages: list[dict[str, str]], agent: str) -> dict[str, Any]:
    """``peers.stream_turn`` plus ``tail``: from the last text chunk to the stream's end,
    what the client waits for after its last token (the write-back, with Redis)."""
    body = {"messages": messages, "max_tokens": TOKENS_OUT, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    text, usage = [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=1800,
                      headers={"X-Agent-ID": agent}) as response:
        response.raise_for_status()
        upstream = response.headers.get(UPSTREAM)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            delta = data["choices"][0]["delta"] if data.get("choices") else {}
            if delta.get("content"):
                text.append(delta["content"])
                last = time.perf_counter()
                first = first or last
    end = time.perf_counter()
    return {"ttft": (first or end) - started, "total": end - started,
            "tail": end - (last or end), "text": "".join(text), "upstream": upstream,
            "prompt": usage.get("prompt_tokens", 0),
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def scrape(server: ServerProcess, name: str, label: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return sum(float(value) for sample, value in samples
               if sample.split("{")[0] == name and label in sample)


def cache_dir(server: ServerProcess) -> Path:
    return Path(server.env["SEMANTIC_CACHE_DIR"])


def cache_files(server: ServerProcess) -> list[Path]:
    return [p for p in cache_dir(server).glob("*/*.safetensors") if p.parent.name != "quarantine"]


def agent_file(server: ServerProcess, agent: str) -> Path:
    return next(cache_dir(server).glob(f"*/{agent_file_name(agent)}"))


def pick_agents(nginx: TracedNginx, replicas: list[ServerProcess], count: int,
                ) -> dict[str, tuple[int, str]]:
    """``count`` agent ids, half routed to each replica: id -> (history number, replica)."""
    room = {replicas[0].url: count - count // 2, replicas[1].url: count // 2}
    chosen: dict[str, tuple[int, str]] = {}
    number = 0
    while len(chosen) < count:
        agent = f"agent-{number}"
        replica = nginx.replica_of(agent)
        if room[replica] > 0:
            room[replica] -= 1
            chosen[agent] = (number, replica)
        number += 1
        if number > 50 * count:
            raise RuntimeError(f"nginx sends nearly every agent to one replica: {room}")
    return chosen


def redis_memory(client: Any) -> dict[str, int]:
    info = client.info("memory")
    keys = list(client.scan_iter("semantic:cache:*"))
    return {"used_memory": info["used_memory"], "used_memory_rss": info["used_memory_rss"],
            "cache_values": len(keys), "cache_value_bytes": sum(map(client.strlen, keys)),
            # what the allocator gave each value (jemalloc rounds a large one up)
            "cache_memory_usage": sum(client.memory_usage(key, samples=0) for key in keys),
            "leases": sum(1 for _ in client.scan_iter("semantic:lease:*"))}


def in_threads(*jobs: Callable[[], Any]) -> None:
    failures: list[BaseException] = []

    def run(job: Callable[[], Any]) -> None:
        try:
            job()
        except BaseException as exc:  # reported below, on the main thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def cold_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same turn for a new agent, differing from every other prompt within its first
    user words (about 25 tokens in), so no hot cache seeds it."""
    first = dict(messages[0], content="[cold start] " + messages[0]["content"])
    return [first, *messages[1:]]


def failover(redis: RedisProcess, replicas: list[ServerProcess], local: ServerProcess,
             agents: int, tokens: int) -> dict[str, Any]:
    """Turn 1 through nginx; the file server takes the same turn 1 for the agents that will
    fail over and restarts; a replica is killed; turn 2 for every agent, and for each
    failed-over one, in rotating order, the same turn from the file server's folder and a
    cold prefill of it."""
    client = redis.client()
    before = redis_memory(client)
    in_threads(*(server.start for server in (*replicas, local)))
    nginx = TracedNginx([r.url for r in replicas]).start()
    local_nginx = TracedNginx([local.url]).start()
    killed, survivor = replicas
    try:
        chosen = pick_agents(nginx, replicas, agents)
        moved = [a for a, (_, w) in chosen.items() if w == killed.url]
        messages = {a: first_turn(n, tokens) for a, (n, _) in chosen.items()}
        turn1: dict[str, dict] = {}
        local1: dict[str, dict] = {}

        def build(url: str, agents: list[str], into: dict[str, dict]) -> Callable[[], None]:
            def run() -> None:
                for agent in agents:
                    into[agent] = turn(url, messages[agent], agent)
            return run

        served_before = [scrape(r, "semantic_request_seconds_count") for r in replicas]
        in_threads(build(nginx.url, moved, turn1),
                   build(nginx.url, [a for a in chosen if a not in moved], turn1),
                   build(local_nginx.url, moved, local1))
        served = [scrape(r, "semantic_request_seconds_count") - b
                  for r, b in zip(replicas, served_before, strict=True)]
        assert served == [len(moved), agents - len(moved)], served  # as the probe said
        assert all(turn1[a]["upstream"] == killed.url.removeprefix("http://") for a in moved)
        leases_after_turn1 = redis_memory(client)["leases"]
        local.stop()  # SIGTERM: every hot cache to its folder
        local.start()  # the same port and folder
        print(f"turn 1: {served} agents per replica; killing {killed.url}", flush=True)
        killed.stop(signal.SIGKILL)
        turn2: dict[str, dict] = {}
        local2: dict[str, dict] = {}
        cold2: dict[str, dict] = {}
        for agent in chosen:
            messages[agent] = next_turn(messages[agent], turn1[agent]["text"], 2)
            if agent not in moved:
                turn2[agent] = turn(nginx.url, messages[agent], agent)
                print(f"  {agent} (stayed): TTFT {turn2[agent]['ttft']:.2f} s, cached "
                      f"{turn2[agent]['cached']}/{turn2[agent]['prompt']}", flush=True)
                continue
            kinds = [
                lambda a=agent: turn2.__setitem__(a, turn(nginx.url, messages[a], a)),
                lambda a=agent: local2.__setitem__(a, turn(local_nginx.url, messages[a], a)),
                lambda a=agent: cold2.__setitem__(a, turn(
                    local_nginx.url, cold_messages(messages[a]), f"cold-{a}")),
            ]
            shift = moved.index(agent) % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                kind()
            assert cold2[agent]["cached"] < SEEDING, ("a cold turn was seeded", cold2[agent])
            print(f"  {agent} (failed over): from Redis {turn2[agent]['ttft']:.2f} s (cached "
                  f"{turn2[agent]['cached']}/{turn2[agent]['prompt']}), local folder "
                  f"{local2[agent]['ttft']:.2f} s (cached {local2[agent]['cached']}), cold "
                  f"{cold2[agent]['ttft']:.2f} s", flush=True)
    finally:
        nginx.stop()
        local_nginx.stop()
    after = redis_memory(client)
    files = {"survivor": [p.stat().st_size for p in cache_files(survivor)],
             "killed": [p.stat().st_size for p in cache_files(killed)]}
    rows = {agent: {"number": n, "failed_over": agent in moved, "turn1": turn1[agent],
                    "turn2": turn2[agent],
                    "warm": turn2[agent]["cached"] >= WARM * turn1[agent]["prompt"]}
            for agent, (n, _) in chosen.items()}
    for agent in moved:
        rows[agent].update(local_turn1=local1[agent], local_turn2=local2[agent],
                           cold_turn2=cold2[agent], local_warm=local2[agent]["cached"]
                           >= WARM * local1[agent]["prompt"])
    used = after["used_memory"] - before["used_memory"]
    mirrored = sum(files["survivor"])
    redis_ttft = [turn2[a]["ttft"] for a in moved]
    local_ttft = [local2[a]["ttft"] for a in moved]
    cold_ttft = [cold2[a]["ttft"] for a in moved]
    paired = [r / x for r, x in zip(redis_ttft, local_ttft, strict=True)]
    median = statistics.median
    return {
        "agents": rows, "failed_over": moved,
        "warm": sum(r["warm"] for r in rows.values()),
        "warm_failed_over": sum(rows[a]["warm"] for a in moved),
        "warm_local": sum(rows[a]["local_warm"] for a in moved),
        "same_turn1_reply_local": sum(local1[a]["text"] == turn1[a]["text"] for a in moved),
        "ttft_failed_over": redis_ttft, "ttft_local": local_ttft, "ttft_cold": cold_ttft,
        "ttft_stayed_hot": [turn2[a]["ttft"] for a in chosen if a not in moved],
        "median_ttft_failed_over": median(redis_ttft), "median_ttft_local": median(local_ttft),
        "median_ttft_cold": median(cold_ttft),
        "ratio_failed_over_to_local": median(redis_ttft) / median(local_ttft),
        "paired_ratio_median": median(paired), "paired_ratio_max": max(paired),
        "ratio_cold_to_failed_over": median(cold_ttft) / median(redis_ttft),
        "survivor_disk_lookups": scrape(survivor, "semantic_cache_lookups_total", '"disk"'),
        "local_disk_lookups": scrape(local, "semantic_cache_lookups_total", '"disk"'),
        "taken_from_shared_store_log_lines":
            survivor.output().count("agent cache taken from the shared store"),
        "leases_left_after_turn1": leases_after_turn1, "leases_left_after_turn2": after["leases"],
        "redis_before": before, "redis_after": after, "redis_used_memory_delta": used,
        "file_bytes": {k: sum(v) for k, v in files.items()},
        "file_counts": {k: len(v) for k, v in files.items()},
        "redis_delta_vs_survivor_files": used / mirrored,
        "redis_values_vs_survivor_files": after["cache_value_bytes"] / mirrored,
        "_messages": messages,
    }


def write_cost(part: dict[str, Any], redis: RedisProcess, survivor: ServerProcess,
               file_server: ServerProcess, turns: int) -> dict[str, Any]:
    """The failed-over agents' next turns on the Redis replica and on the file server,
    direct, alternating which goes first: end to end, and the tail after the last token."""
    pairs: list[dict[str, Any]] = []
    moved = part["failed_over"]
    for number in range(3, 3 + turns):
        for index, agent in enumerate(moved):
            reply = (part["agents"][agent]["turn2"]["text"] if number == 3
                     else pairs[-len(moved)]["redis"]["text"])
            messages = part["_messages"][agent] = next_turn(part["_messages"][agent], reply,
                                                            number)
            order = [("file", file_server), ("redis", survivor)]
            if (index + number) % 2:
                order.reverse()
            row: dict[str, Any] = {"agent": agent, "turn": number}
            for store, server in order:
                row[store] = turn(server.url, messages, agent)
            row["file_mb"] = agent_file(survivor, agent).stat().st_size / MB
            row["added_total_ms"] = (row["redis"]["total"] - row["file"]["total"]) * 1e3
            row["added_tail_ms"] = (row["redis"]["tail"] - row["file"]["tail"]) * 1e3
            row["added_ttft_ms"] = (row["redis"]["ttft"] - row["file"]["ttft"]) * 1e3
            row["same_text"] = row["redis"]["text"] == row["file"]["text"]
            pairs.append(row)
            print(f"  turn {number} {agent}: total file {row['file']['total']:.3f} s, redis "
                  f"{row['redis']['total']:.3f} s; tail file {row['file']['tail'] * 1e3:.0f}"
                  f" ms, redis {row['redis']['tail'] * 1e3:.0f} ms; {row['file_mb']:.1f} MB",
                  flush=True)
    median = statistics.median
    size = median(p["file_mb"] for p in pairs)
    tail = median(p["added_tail_ms"] for p in pairs)
    return {
        "pairs": pairs, "turns": turns, "median_file_mb": size,
        **{f"median_{k}_{store}_s": median(p[store][k] for p in pairs)
           for k in ("total", "ttft", "tail") for store in ("file", "redis")},
        "median_added_tail_ms": tail,
        "median_added_total_ms": median(p["added_total_ms"] for p in pairs),
        "median_added_ttft_ms": median(p["added_ttft_ms"] for p in pairs),
        "added_tail_ms_per_mb": median(p["added_tail_ms"] / p["file_mb"] for p in pairs),
        "same_text": sum(p["same_text"] for p in pairs),
        "parts": write_parts(agent_file(survivor, moved[0]), redis),
    }


def write_parts(path: Path, redis: RedisProcess, repeats: int = 5) -> dict[str, Any]:
    """The write-back's steps alone, on one of the agents' files: a file write with fsync and
    rename (as the writer does), reading it back (as the Redis put does), a Redis SET."""
    data = path.read_bytes()
    folder = Path(tempfile.mkdtemp(prefix="exp019-write-", dir=path.parent.parent))
    client = redis.client()
    steps: dict[str, list[float]] = {"file_write_fsync_ms": [], "file_read_ms": [],
                                     "redis_set_ms": []}
    target = folder / "probe.safetensors"
    for _ in range(repeats):
        started = time.perf_counter()
        write_atomically(target, lambda tmp: tmp.write_bytes(data))
        steps["file_write_fsync_ms"].append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        target.read_bytes()
        steps["file_read_ms"].append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        client.set("exp019:probe", data)
        steps["redis_set_ms"].append((time.perf_counter() - started) * 1e3)
    client.delete("exp019:probe")
    target.unlink()
    folder.rmdir()
    return {"file_mb": len(data) / MB, **steps,
            **{f"median_{k}": statistics.median(v) for k, v in steps.items()}}


def plot(data: dict[str, Any], path: Path) -> None:
    fail, cost = data["failover"], data["write_cost"]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    left = axes[0]
    groups = [("cold prefill", fail["ttft_cold"], "#999"),
              ("local folder", fail["ttft_local"], "#27a"),
              ("failed over\n(Redis)", fail["ttft_failed_over"], "#a72"),
              ("stayed (hot)", fail["ttft_stayed_hot"], "#2a7")]
    for i, (_, values, colour) in enumerate(groups):
        left.bar(i, statistics.median(values), color=colour)
        left.scatter([i] * len(values), values, color="black", s=8, zorder=3)
    left.set_xticks(range(len(groups)), [g[0] for g in groups])
    left.set_yscale("log")
    left.set_ylabel("TTFT of turn 2, s (median bar, agents dots)")
    left.set_title(f"{fail['warm']}/{len(fail['agents'])} warm after failover; Redis / local "
                   f"{fail['ratio_failed_over_to_local']:.2f}x")
    middle = axes[1]
    pairs = cost["pairs"]
    middle.scatter([p["file_mb"] for p in pairs], [p["added_tail_ms"] for p in pairs],
                   color="#a72", label="after the last token")
    middle.scatter([p["file_mb"] for p in pairs], [p["added_total_ms"] for p in pairs],
                   color="#999", s=10, label="end to end (noisier)")
    middle.axhline(0, color="#999", linewidth=0.8)
    middle.legend(fontsize=8)
    middle.set_xlabel("cache file, MB")
    middle.set_ylabel("Redis store - file store, ms")
    middle.set_title(f"write-back: +{cost['median_added_tail_ms']:.0f} ms a turn "
                     f"({cost['added_tail_ms_per_mb']:.1f} ms/MB)")
    right = axes[2]
    mib = 2**20
    bars = [("Redis\nused_memory", fail["redis_used_memory_delta"] / mib),
            (f"survivor's\nfiles ({fail['file_counts']['survivor']})",
             fail["file_bytes"]["survivor"] / mib),
            (f"killed replica's\nfiles ({fail['file_counts']['killed']})",
             fail["file_bytes"]["killed"] / mib)]
    right.bar([b[0] for b in bars], [b[1] for b in bars], color=["#a72", "#27a", "#9bd"])
    right.set_ylabel("MiB")
    right.set_title(f"Redis {fail['redis_delta_vs_survivor_files']:.2f}x the files it mirrors")
    figure.suptitle(f"EXP-019: {len(fail['agents'])} agents, ~{data['tokens']} tokens each, "
                    f"2 SmolLM2 replicas behind nginx, one killed")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    agents, tokens, turns = (4, 300, 1) if args.quick else (16, 1000, 3)
    started = time.perf_counter()
    redis = RedisProcess().start()
    replicas = [ServerProcess(SMOLLM2, cache_store=redis.url) for _ in range(2)]
    local = ServerProcess(SMOLLM2)  # the file store, the default
    try:
        print(f"failover: {agents} agents, ~{tokens} tokens of history", flush=True)
        part = failover(redis, replicas, local, agents, tokens)
        print(f"warm {part['warm']}/{agents}; Redis +{part['redis_used_memory_delta'] / MB:.0f}"
              f" MB, files {part['file_bytes']}", flush=True)
        print("write-back cost:", flush=True)
        cost = write_cost(part, redis, replicas[1], local, turns)
    finally:
        for server in (*replicas, local):
            if server.process is not None:
                server.stop()
        redis.stop()
    for server in (*replicas, local):
        for line in server.output().splitlines():
            if '"level": "error"' in line or '"level": "warning"' in line:
                print(f"  {server.url} ({server.log_path}): {line[:300]}")
    part.pop("_messages")
    wall = time.perf_counter() - started
    data = {"tokens": tokens, "tokens_out": TOKENS_OUT, "warm_share": WARM,
            "failover": part, "write_cost": cost, "wall_seconds": wall}
    name = "exp019_replicas" + ("_quick" if args.quick else "")
    write_results(name, data, args.results)
    plot(data, args.results / f"{name}.png")
    print(f"warm after failover {part['warm']}/{agents}; failover TTFT "
          f"{part['median_ttft_failed_over']:.2f} s vs local {part['median_ttft_local']:.2f} s "
          f"({part['ratio_failed_over_to_local']:.2f}x) vs cold {part['median_ttft_cold']:.2f}"
          f" s; write-back +{cost['median_added_tail_ms']:.0f} ms a turn, "
          f"{cost['added_tail_ms_per_mb']:.1f} ms/MB; wall {wall:.0f} s")


if __name__ == "__main__":
    main()
