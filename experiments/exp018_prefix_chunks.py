"""EXP-018 (prefix chunks): agents sharing a system prompt, on disk once, and new agents
starting from it.

A agents (default 32) on SmolLM2 share a system prompt of about S tokens (1,500) and send
O tokens (300) of their own; our server, as a process, with the default chunks
(``SEMANTIC_CACHE_CHUNK_TOKENS=128``). Then:

* **disk bytes**: the cache folder after a clean shutdown (every agent's file and the
  chunks), against the same caches written as whole files (each file read back and written
  again with no chunks: today's format, the same KV);
* **first-turn TTFT**, per repetition on a freshly started server (nothing hot), in this
  order: a new agent whose prompt starts with the known system prompt (``disk_seed``: from
  the chunks on disk), a second new agent (``hot_seed``: from the first one's hot cache), an
  existing agent's next turn with O new tokens (``restore``: its file read back), the same
  agent's following turn with O new tokens (``warm``: hot), and a new agent with another
  system prompt of the same length (``cold``: nothing to start from, it prefills all);
* with ``--gemma-agents N``, the disk bytes of N agents on Gemma 3, whose sliding-window
  layers stay whole in each agent's file: what is shared for them.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import zlib
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.harness import GEMMA, SMOLLM2, arguments, history, write_results
from experiments.peers import stream_turn
from semantic_server.cache.cache_file import read_cache, write_cache
from tests.servers import ServerProcess

KINDS = ("cold", "disk_seed", "hot_seed", "restore", "warm")


def system_prompt(tokens: int, crew: int = 0) -> dict[str, str]:
    return {"role": "system", "content": f"You are one of crew {crew}'s agents. "
            + history(crew, tokens)}


def own(agent: str, tokens: int) -> dict[str, str]:
    return {"role": "user", "content": history(zlib.crc32(agent.encode()) % 10_000, tokens)
            + f"\n({agent}) Summarise."}


def folder_bytes(folder: Path) -> tuple[int, int, int]:
    """Bytes of every cache file and chunk under ``folder``; how many files and chunks."""
    files = [p for p in folder.glob("*/*.safetensors")]
    chunks = [p for p in folder.glob("*/chunks/*.safetensors")]
    return sum(p.stat().st_size for p in files + chunks), len(files), len(chunks)


def whole_bytes(folder: Path) -> int:
    """The same caches as whole files: each read back (with its chunks) and written again
    with no chunks."""
    out = Path(tempfile.mkdtemp(prefix="exp018-whole-"))
    try:
        total = 0
        for path in folder.glob("*/*.safetensors"):
            entry = read_cache(path)
            assert entry.tag is not None
            total += write_cache(out / path.parent.name / path.name, entry.tag, entry)
        return total
    finally:
        shutil.rmtree(out, ignore_errors=True)


def build(model: str, cache_dir: Path, agents: int, system: dict, own_tokens: int,
          ) -> dict[str, list[dict]]:
    """Every agent's first turn, then a clean shutdown (every cache written)."""
    histories = {}
    server = ServerProcess(model, cache_dir=str(cache_dir)).start()
    try:
        for i in range(agents):
            agent = f"agent-{i}"
            messages = [system, own(agent, own_tokens)]
            turn = stream_turn(server.url, messages, 4, agent=agent, model=model)
            histories[agent] = [*messages, {"role": "assistant", "content": turn["text"]}]
    finally:
        server.stop()
    return histories


def timed(url: str, rows: list[dict], agent: str, messages: list[dict]) -> dict:
    """One streamed turn, its TTFT and cached tokens added to ``rows``."""
    result = stream_turn(url, messages, 4, agent=agent, model=SMOLLM2)
    rows.append({"agent": agent, "ttft": result["ttft"], "prompt": result["prompt"],
                 "cached": result["cached"]})
    return result


def first_turns(cache_dir: Path, histories: dict[str, list[dict]], system: dict,
                own_tokens: int, repeats: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for r in range(repeats):
        server = ServerProcess(SMOLLM2, cache_dir=str(cache_dir)).start()
        try:
            for kind in ("disk_seed", "hot_seed"):
                agent = f"new-{kind}-{r}"
                timed(server.url, rows[kind], agent, [system, own(agent, own_tokens)])
            agent = f"agent-{r}"
            for kind in ("restore", "warm"):
                messages = [*histories[agent], own(f"{agent}-{kind}", own_tokens)]
                reply = timed(server.url, rows[kind], agent, messages)
                histories[agent] = [*messages, {"role": "assistant", "content": reply["text"]}]
            agent = f"other-{r}"  # another crew's system prompt: nothing to start from
            timed(server.url, rows["cold"], agent,
                  [system_prompt(len(system["content"]) // 4, crew=r + 1),
                   own(agent, own_tokens)])
        finally:
            server.stop()
    return rows


def plot(data: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    disk = data["disk"]
    left.bar(["whole files", "chunks"], [disk["whole_bytes"] / 1e6, disk["chunked_bytes"] / 1e6],
             color=["#999", "tab:green"])
    left.set_ylabel("MB on disk")
    left.set_title(f"{data['agents']} agents, {disk['ratio']:.2f}x")
    medians = [data["median_ttft"][kind] for kind in KINDS]
    right.bar(KINDS, medians, color=["#999", "tab:green", "tab:olive", "tab:blue", "tab:cyan"])
    right.set_ylabel("median TTFT (s)")
    right.set_title("first turn of a new agent vs an existing one")
    fig.suptitle("EXP-018: a shared system prompt in content-addressed chunks (SmolLM2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--gemma-agents", type=int, default=0, help="also measure disk bytes on Gemma 3"))
    agents, system_tokens, own_tokens, repeats = (4, 300, 60, 1) if args.quick else (
        32, 1500, 300, 5)
    system = system_prompt(system_tokens)
    cache_dir = Path(tempfile.mkdtemp(prefix="exp018-chunks-"))
    try:
        histories = build(SMOLLM2, cache_dir, agents, system, own_tokens)
        chunked, files, chunks = folder_bytes(cache_dir)
        whole = whole_bytes(cache_dir)
        disk = {"chunked_bytes": chunked, "whole_bytes": whole, "ratio": chunked / whole,
                "files": files, "chunk_files": chunks}
        print(f"disk: chunks {chunked / 1e6:.1f} MB, whole files {whole / 1e6:.1f} MB "
              f"({chunked / whole:.2f}x), {files} files, {chunks} chunks")
        rows = first_turns(cache_dir, histories, system, own_tokens, repeats)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    medians = {kind: statistics.median(row["ttft"] for row in rows[kind]) for kind in KINDS}
    data: dict[str, Any] = {
        "model": SMOLLM2, "agents": agents, "system_tokens": system_tokens,
        "own_tokens": own_tokens, "repeats": repeats, "disk": disk, "turns": rows,
        "median_ttft": medians,
        "disk_seed_over_warm": medians["disk_seed"] / medians["warm"],
        "disk_seed_over_cold": medians["disk_seed"] / medians["cold"],
        "median_cached": {kind: statistics.median(row["cached"] for row in rows[kind])
                          for kind in KINDS}}
    for kind in KINDS:
        print(f"{kind:>10}: median TTFT {medians[kind]:.2f} s, cached "
              f"{data['median_cached'][kind]:.0f}")
    print(f"new agent from the chunks: {data['disk_seed_over_warm']:.2f}x a warm turn, "
          f"{data['disk_seed_over_cold']:.2f}x a cold prefill")
    if args.gemma_agents:
        gemma_dir = Path(tempfile.mkdtemp(prefix="exp018-gemma-"))
        try:
            build(GEMMA, gemma_dir, args.gemma_agents, system, own_tokens)
            gemma_chunked, _, gemma_chunks = folder_bytes(gemma_dir)
            gemma_whole = whole_bytes(gemma_dir)
        finally:
            shutil.rmtree(gemma_dir, ignore_errors=True)
        data["gemma"] = {"agents": args.gemma_agents, "chunked_bytes": gemma_chunked,
                         "whole_bytes": gemma_whole, "chunk_files": gemma_chunks,
                         "ratio": gemma_chunked / gemma_whole}
        print(f"gemma: {args.gemma_agents} agents, chunks {gemma_chunked / 1e6:.1f} MB, "
              f"whole {gemma_whole / 1e6:.1f} MB ({gemma_chunked / gemma_whole:.2f}x)")
    path = write_results("exp018_prefix_chunks", data, args.results)
    plot(data, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
