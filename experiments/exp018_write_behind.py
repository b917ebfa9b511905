"""EXP-018 (write-behind): what an LRU spill costs the running streams, with the cache file
written on the engine thread (``SEMANTIC_CACHE_WRITE_BEHIND=false``, the old way) and on
the writer thread (the default), in one run.

A spill is a hot agent cache evicted to make room in the KV budget while other requests
run. Written on the engine thread, its file (about 46 KB a token in SmolLM2's native
float32, so some 80 MB for an agent of 1,800 tokens) stalls every running stream until it
is on disk; written behind, the engine thread only prepares it. Targets from the issue:
the engine thread's longest stall per spill under 10 ms, and the decode throughput of 8
agents while spills happen at least 0.9x of the same workload without spills.

Each run, on an in-process server on SmolLM2 (greedy, run to max_tokens):

1. I idle agents have hot caches of a history of about H tokens each (H=1,800 makes 1,618
   in SmolLM2's tokenizer), least recently used first: one
   real turn made such a cache at the start, and each idle agent gets a copy of its arrays
   (buffers of its own, their unused tails included), so no run prefills them. Each idle
   agent is in a tenant of its own, so its spill writes all its chunks (the default
   ``SEMANTIC_CACHE_CHUNK_TOKENS``), as a distinct history's would.
2. 8 agents start decoding D tokens each. Once all 8 have their first token, the KV
   budget is cut to what is held (the idle caches and the 8 reservations) plus half an
   idle cache, so nothing more fits without a spill.
3. While they decode (from 15% to 75% of their tokens), A new agents arrive, one after
   another, each with a short message and ``max_tokens`` H: the room reserved for a reply
   that long evicts the least recently used idle agent (now and then two), a spill. The
   new agents decode beside the 8 until the 8 are done, then hang up.

Modes: ``no_spills`` (the same workload with the budget left high: the baseline), ``sync``
(native files written on the engine thread), ``write_behind`` (native, the default), and
both again in the ``q4`` format (its conversion runs on the engine thread even when written
behind). One server runs them all: before each run the store is set as the mode's settings
make it (the writer thread or none, the file format) and emptied. R repetitions, the modes
in a rotated order each time; each ratio is taken within its repetition.

Measured: the 8 agents' decode throughput (their generated tokens over the wall time from
their submission to the last one's end; its ratio to ``no_spills`` in each repetition,
and the median of those ratios); the engine thread's stall per spill (time inside
``AgentCacheStore._spill``, timed by a wrapper set on the server's store: max, median,
count, KV and file bytes, and the engine thread's CPU time in it, which leaves out the
time it waited for a core or for Python's GIL; the wrapper first waits for the batch step
mlx-lm is computing ahead, a wait that step pays anyway, so the time is the spill's own);
the gaps between the decode steps while the 8 run (every running stream's token gap: p50,
p99, max; the times each batch step returned, noted by a wrapper on the lane's
generator); the writer thread's time per file. Checked after every run: every spilled
agent's file is on disk, and one spilled agent's next turn is restored from it.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import time
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.exp018_disk_formats import messages
from experiments.harness import Harness, arguments, write_results
from semantic_server.cache.cache_file import AgentCache
from semantic_server.config import DiskFormat
from semantic_server.engine.batch_engine import batch_generator
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import GenerationParams
from semantic_server.request_outcome import Outcome

DECODERS = 8
BIG_BUDGET = 8 << 30  # no spill: the baseline keeps it; the other modes cut it at run time
STALL_TARGET_MS = 10.0
THROUGHPUT_TARGET = 0.9


@dataclass(frozen=True)
class Mode:
    name: str
    write_behind: bool
    disk_format: DiskFormat
    spills: bool = True


MODES = (Mode("no_spills", True, DiskFormat.NATIVE, spills=False),
         Mode("sync", False, DiskFormat.NATIVE),
         Mode("write_behind", True, DiskFormat.NATIVE),
         Mode("sync_q4", False, DiskFormat.Q4),
         Mode("write_behind_q4", True, DiskFormat.Q4))


@dataclass(frozen=True)
class Config:
    idle: int  # I: idle agents with hot caches
    history: int  # H: tokens of each idle agent's history (and each new agent's max_tokens)
    arrivals: int  # A: new agents, one spill each
    decode: int  # D: tokens each of the 8 decodes
    repeats: int  # R


def decoder_messages(agent: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Agent {agent} here. Tell me a long story about "
                                        "the old port and its trading houses."}]


def arrival_messages(agent: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"New agent {agent}. Describe the harbour at dawn."}]


async def stream(harness: Harness, agent: str, messages: list[dict[str, str]],
                 max_tokens: int, stamps: list[float],
                 stop: asyncio.Event | None = None) -> tuple[Outcome | None, float]:
    """One request's stream: the time each text chunk came (into ``stamps``), its outcome
    and when it came; hangs up (None) at the first chunk after ``stop`` is set."""
    params = GenerationParams(max_tokens=max_tokens, sampling=SamplingParams())
    run = harness.server.service.generate(agent, messages, params)
    async with aclosing(run):
        async for item in run:
            if isinstance(item, Outcome):
                return item, time.perf_counter()
            if isinstance(item, str):
                stamps.append(time.perf_counter())
                if stop is not None and stop.is_set():
                    return None, time.perf_counter()
    raise RuntimeError("the generation ended without an outcome")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def copied(layers: list[Any]) -> list[Any]:
    """Fresh arrays of the same shapes (the buffers' unused tails too) and offsets."""
    out = []
    for layer in layers:
        if type(layer) is not KVCache:
            raise RuntimeError(f"expected KVCache layers, not {type(layer).__name__}")
        new = KVCache()
        new.keys, new.values = (mx.array(np.array(a)) for a in (layer.keys, layer.values))
        new.offset = layer.offset
        out.append(new)
    mx.eval([(layer.keys, layer.values) for layer in out])
    return out


class Bench:
    """One server for every run: each mode sets the store as its setting would (the
    writer thread or none, the disk format), and each run starts from the same state."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.harness = Harness(make_generator=partial(batch_generator, stop_at_eos=False),
                               max_context_tokens=8192, kv_budget_bytes=BIG_BUDGET,
                               cache_write_behind=True)
        self.store, self.engine = self.harness.server.store, self.harness.server.engine
        self.writer = self.store.writer
        self.spills: list[dict[str, Any]] = []
        self.writes: list[float] = []
        self.steps: list[float] = []
        self._instrument()
        # the template: one idle agent's hot cache, made by a real turn
        template = self.harness.turn("template", messages(0, config.history), 8)
        self.reply = template.text

        def keep() -> AgentCache:
            return next(e for (_, agent), e in self.store._hot.items() if agent == "template")
        self.template = self.harness.run(self.engine.on_thread(keep))

    def _instrument(self) -> None:
        """Time every spill on the engine thread, and every file the writer writes."""
        store, spill, write = self.store, self.store._spill, self.writer._write

        def timed_spill(entry: Any) -> None:
            tokens, kv_bytes = len(entry.tokens), store._exact_bytes(entry)
            path = store._path(store._tag(entry), entry.agent_id)
            # The batch's next step is computing meanwhile (mlx-lm evaluates it ahead): the
            # spill's first evaluation would wait for it, a wait the step pays anyway. Wait
            # for it here, outside the timing, so the stall is the spill's own.
            waited = time.perf_counter()
            mx.synchronize()
            started, cpu = time.perf_counter(), time.thread_time()
            spill(entry)
            self.spills.append({"ms": (time.perf_counter() - started) * 1e3,
                                "cpu_ms": (time.thread_time() - cpu) * 1e3,
                                "step_wait_ms": (started - waited) * 1e3,
                                "agent": entry.agent_id, "tokens": tokens,
                                "kv_bytes": kv_bytes, "path": path})

        def timed_write(path: Path, prepared: Any) -> int:
            started = time.perf_counter()
            size = write(path, prepared)
            self.writes.append((time.perf_counter() - started) * 1e3)
            return size

        store._spill = timed_spill
        self.writer._write = timed_write

    def _time_steps(self) -> None:
        """Engine thread: note when each batch step returns (the tokens of every running
        stream come out then, so the time between two is every stream's token gap)."""
        generator = next(iter(self.engine._lanes.values())).generator
        if getattr(generator, "timed", False):
            return
        step = generator.next

        def timed_next() -> Any:
            out = step()
            self.steps.append(time.perf_counter())
            return out

        generator.next, generator.timed = timed_next, True

    def set_mode(self, mode: Mode) -> None:
        """Engine thread, nothing running: the store as the mode's settings make it, the
        budget high, no cache hot or on disk (the template stays out of the store)."""
        store = self.store
        store.flush()
        store.writer = self.writer if mode.write_behind else None
        store.disk_format = mode.disk_format
        store.pool.budget_bytes = BIG_BUDGET
        for key in store.pool.agents():
            del store._hot[key]
            store.pool.release(key)
        for path in store.cold_files():
            store._delete(path, "the next run starts empty")
        store.write_failures = 0
        self._time_steps()

    def idle_hot(self, idle: list[str]) -> None:
        """Engine thread: the idle agents' caches hot (copies of the template's arrays),
        least recently used first."""
        tag = next(iter(self.engine._lanes.values())).tag
        for agent in idle:
            self.store.checkin(AgentCache(agent, copied(self.template.layers),
                                          list(self.template.tokens), tag))

    def run(self, mode: Mode, run: int) -> dict[str, Any]:
        self.harness.run(self.engine.on_thread(lambda: self.set_mode(mode)))
        self.spills.clear()
        self.writes.clear()
        self.steps.clear()
        result = self.harness.run(self.workload(mode, run))
        stalls = result["stall_ms"]
        print(f"run {run} {mode.name:>16}: {result['tokens_per_second']:6.1f} tok/s, "
              f"{result['spills']:2d} spills, stall max {max(stalls, default=0):7.1f} ms "
              f"(cpu {max(result['stall_cpu_ms'], default=0):6.1f}), "
              f"gap p99 {result['gap_ms']['p99']:6.0f} ms max {result['gap_ms']['max']:6.0f} "
              f"ms", flush=True)
        return result

    async def workload(self, mode: Mode, run: int) -> dict[str, Any]:
        config, harness, store, engine = self.config, self.harness, self.store, self.engine
        tag = f"{run}-{mode.name}"
        # each idle agent in a tenant of its own: its chunks are its own, as a distinct
        # history's would be (the copies share their tokens, so in one tenant their
        # chunks would be written once)
        idle = [f"idle-{tag}-{i}/agent" for i in range(config.idle)]
        await engine.on_thread(lambda: self.idle_hot(idle))
        dims = harness.server.versions.loaded.dims
        slack = store.pool.bytes_for(dims, config.history) // 2

        stamps: list[list[float]] = [[] for _ in range(DECODERS)]
        submitted = time.perf_counter()
        decoders = [asyncio.create_task(stream(harness, f"decoder-{tag}-{i}",
                                               decoder_messages(i), config.decode, stamps[i]))
                    for i in range(DECODERS)]
        while not all(stamps):
            await asyncio.sleep(0.002)
        decoding = time.perf_counter()
        if mode.spills:
            def cut() -> int:
                pool = store.pool
                pool.budget_bytes = pool.used + pool.reserved + slack
                return pool.budget_bytes
            budget = await engine.on_thread(cut)
        else:
            budget = store.pool.budget_bytes
        stop = asyncio.Event()
        arrivals = []
        for k in range(config.arrivals):
            due = config.decode * (0.15 + 0.6 * k / max(1, config.arrivals - 1))
            while min(len(s) for s in stamps) < due and not all(d.done() for d in decoders):
                await asyncio.sleep(0.002)
            arrivals.append(asyncio.create_task(stream(
                harness, f"new-{tag}-{k}", arrival_messages(k), config.history, [], stop)))
        ends = await asyncio.gather(*decoders)
        stop.set()
        await asyncio.gather(*arrivals)
        outcomes = [outcome for outcome, _ in ends]
        assert all(o is not None and o.completion_tokens == config.decode for o in outcomes)
        generated = sum(o.completion_tokens for o in outcomes if o is not None)
        seconds = max(at for _, at in ends) - submitted
        ended = max(at for _, at in ends)
        steps = [at for at in self.steps if decoding <= at <= ended]
        gaps = [(b - a) * 1e3 for a, b in pairwise(steps)]
        chunk_gaps = [(b - a) * 1e3 for s in stamps for a, b in pairwise(s)]

        # What written-behind spills still hold once the writer is idle, before anything
        # collects its results (the store does on an agent's checkout, or a flush).
        held = {}
        if store.writer is not None:
            while self.writer._jobs.unfinished_tasks:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            held = {"pending_after_writes": len(store._pending),
                    "pending_kv_bytes": sum(store._exact_bytes(p.entry)
                                            for p in store._pending.values()),
                    "uncollected_results": len(self.writer.done)}
        await engine.on_thread(store.flush)

        # Every spill reached the disk; one spilled idle agent comes back from its file.
        spills = list(self.spills)
        missing = [s["agent"] for s in spills if not s["path"].exists()]
        sizes = [s["path"].stat().st_size for s in spills if s["path"].exists()]
        restored = None
        back = next((agent for agent in idle if any(s["agent"] == agent for s in spills)),
                    None)
        if back is not None:
            turn = await harness._turn(back, messages(0, config.history, self.reply), 8)
            history_tokens = len(self.template.tokens)
            restored = {"agent": back, "cached_tokens": turn.cached,
                        "history_tokens": history_tokens,
                        "restored": turn.cached >= 0.9 * history_tokens}
        return {
            "mode": mode.name, "run": run, "budget_bytes": budget,
            "write_behind_waits_so_far": store.write_behind_waits,
            "write_behind_bound_bytes": store.write_behind_bytes,
            "idle_tokens": len(self.template.tokens),
            "generated": generated, "seconds": seconds,
            "tokens_per_second": generated / seconds,
            "gap_ms": {"p50": percentile(gaps, 0.5), "p99": percentile(gaps, 0.99),
                       "max": max(gaps), "count": len(gaps)},
            "chunk_gap_ms": {"p50": percentile(chunk_gaps, 0.5),
                             "p99": percentile(chunk_gaps, 0.99), "max": max(chunk_gaps)},
            "spills": len(spills), "stall_ms": [s["ms"] for s in spills],
            "stall_cpu_ms": [s["cpu_ms"] for s in spills],
            "step_wait_ms": [s["step_wait_ms"] for s in spills],
            "spill_agents": [s["agent"] for s in spills],
            "spill_tokens": [s["tokens"] for s in spills],
            "spill_kv_bytes": [s["kv_bytes"] for s in spills], "spill_file_bytes": sizes,
            "writer_ms": list(self.writes), "missing_files": missing,
            "write_failures": store.write_failures, "restore_check": restored,
            "held_until_collected": held,
        }

    def close(self) -> None:
        self.harness.close()
        shutil.rmtree(self.harness.cache_dir, ignore_errors=True)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for result in runs:
        by_mode.setdefault(result["mode"], []).append(result)
    base = statistics.median(r["tokens_per_second"] for r in by_mode["no_spills"])
    summary = {}
    for name, results in by_mode.items():
        rates = [r["tokens_per_second"] for r in results]
        # a ratio per repetition (each against its own repetition's baseline), then the median
        ratios = [r["tokens_per_second"] / b["tokens_per_second"] for r, b in
                  zip(results, by_mode["no_spills"], strict=True)]
        stalls = [ms for r in results for ms in r["stall_ms"]]
        kv = [b for r in results for b in r["spill_kv_bytes"]]
        files = [b for r in results for b in r["spill_file_bytes"]]
        writer = [ms for r in results for ms in r["writer_ms"]]
        summary[name] = {
            "runs": len(results), "tokens_per_second": rates,
            "median_tokens_per_second": statistics.median(rates),
            "ratio_to_no_spills": statistics.median(ratios),
            "ratios_per_repetition": ratios,
            "ratio_of_medians": statistics.median(rates) / base,
            "spills": len(stalls),
            "stall_ms_max": max(stalls, default=0.0),
            "stall_ms_median": statistics.median(stalls) if stalls else 0.0,
            "stall_ms_total_per_run": statistics.median(sum(r["stall_ms"]) for r in results),
            # the share of the 8 agents' wall time the engine thread spent inside spills
            "stall_share_of_run": statistics.median(sum(r["stall_ms"]) / 1e3 / r["seconds"]
                                                    for r in results),
            "stall_cpu_ms_max": max((c for r in results for c in r["stall_cpu_ms"]),
                                    default=0.0),
            "stall_cpu_ms_median": statistics.median(c for r in results
                                                     for c in r["stall_cpu_ms"]) if stalls
            else 0.0,
            "step_wait_ms_median": statistics.median(w for r in results
                                                     for w in r["step_wait_ms"]) if stalls
            else 0.0,
            "spill_tokens_median": statistics.median(t for r in results
                                                     for t in r["spill_tokens"]) if stalls
            else 0,
            "spill_kv_bytes_median": statistics.median(kv) if kv else 0,
            "spill_file_bytes_median": statistics.median(files) if files else 0,
            "writer_ms_median": statistics.median(writer) if writer else None,
            "writer_ms_max": max(writer, default=None),
            "gap_ms_p50": statistics.median(r["gap_ms"]["p50"] for r in results),
            "gap_ms_p99": statistics.median(r["gap_ms"]["p99"] for r in results),
            "gap_ms_max": max(r["gap_ms"]["max"] for r in results),
            "missing_files": sum(len(r["missing_files"]) for r in results),
            "write_failures": sum(r["write_failures"] for r in results),
            "restored": all(r["restore_check"] is None or r["restore_check"]["restored"]
                            for r in results),
        }
    return summary


def plot(data: dict[str, Any], path: Path) -> None:
    summary = data["summary"]
    names = list(summary)
    colours = {"no_spills": "#999", "sync": "#a72", "write_behind": "#2a7",
               "sync_q4": "#c96", "write_behind_q4": "#27a"}
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    left, middle, right = axes
    left.bar(names, [summary[n]["ratio_to_no_spills"] for n in names],
             color=[colours[n] for n in names])
    for x, n in enumerate(names):  # each repetition's ratio: the run-to-run noise
        ratios = summary[n]["ratios_per_repetition"]
        left.scatter([x] * len(ratios), ratios, color="k", s=12, zorder=3)
    left.axhline(THROUGHPUT_TARGET, color="k", linestyle="--", linewidth=1)
    left.set_title("8 agents' decode throughput / no spills\n(median, dots: each repetition; "
                   "target >= 0.9)", fontsize=10)
    spilled = [n for n in names if summary[n]["spills"]]
    width = 0.4
    xs = range(len(spilled))
    middle.bar([x - width / 2 for x in xs], [summary[n]["stall_ms_max"] for n in spilled],
               width, label="max", color=[colours[n] for n in spilled])
    middle.bar([x + width / 2 for x in xs], [summary[n]["stall_ms_median"] for n in spilled],
               width, label="median", color=[colours[n] for n in spilled], alpha=0.5)
    middle.axhline(STALL_TARGET_MS, color="k", linestyle="--", linewidth=1)
    middle.set_xticks(list(xs), spilled)
    middle.set_yscale("log")
    middle.set_ylabel("ms (log)")
    middle.set_title("engine thread stall per spill\n(max solid, median light; target < 10 ms)")
    right.bar([x - width / 2 for x in range(len(names))],
              [summary[n]["gap_ms_p99"] for n in names], width, label="p99",
              color=[colours[n] for n in names], alpha=0.5)
    right.bar([x + width / 2 for x in range(len(names))],
              [summary[n]["gap_ms_max"] for n in names], width, label="max",
              color=[colours[n] for n in names])
    right.set_xticks(list(range(len(names))), names)
    right.set_ylabel("ms")
    right.set_title("gap between decode steps while the 8 run\n(p99 light, max solid)")
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=25)
    config, row = data["config"], summary[spilled[0]]
    figure.suptitle(f"LRU spills under load, SmolLM2: {row['spills'] / row['runs']:.0f} spills "
                    f"of {row['spill_tokens_median']} tokens a run while 8 agents decode "
                    f"{config['decode']} tokens, {config['repeats']} repetitions")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    config = (Config(idle=3, history=300, arrivals=2, decode=16, repeats=1) if args.quick
              else Config(idle=12, history=1800, arrivals=8, decode=64, repeats=3))
    started = time.perf_counter()
    bench = Bench(config)
    try:
        runs = [bench.run(MODES[(i + run) % len(MODES)], run)
                for run in range(config.repeats) for i in range(len(MODES))]
    finally:
        bench.close()
    data = {"config": config.__dict__, "decoders": DECODERS,
            "targets": {"stall_ms_max": STALL_TARGET_MS, "throughput_ratio": THROUGHPUT_TARGET},
            "summary": summarise(runs), "runs": runs,
            "wall_seconds": time.perf_counter() - started}
    name = "exp018_write_behind" + ("_quick" if args.quick else "")
    write_results(name, data, args.results)
    plot(data, args.results / f"{name}.png")
    for mode, row in data["summary"].items():
        print(f"{mode:>16}: {row['median_tokens_per_second']:6.1f} tok/s "
              f"({row['ratio_to_no_spills']:.2f}x), {row['spills']} spills, stall max "
              f"{row['stall_ms_max']:.1f} ms median {row['stall_ms_median']:.1f} ms, "
              f"gap p99 {row['gap_ms_p99']:.0f} ms")
    print(f"wall time {data['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
