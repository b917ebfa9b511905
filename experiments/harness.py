"""An in-process server for the experiments: the real engine, caches and orchestrator,
driven without HTTP so that timings measure the server, not the client.

Each experiment builds one ``Harness`` (models from ``models/``, caches in a temporary
folder), runs its workload on the harness's event loop, and writes JSON and a PNG to
``experiments/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

import semantic_server  # noqa: F401  (OpenBLAS before mlx)
from semantic_server.app import start_server, stop_server
from semantic_server.blas import blas_status
from semantic_server.config import Settings
from semantic_server.engine.batch_engine import GeneratorFactory, batch_generator
from semantic_server.engine.jobs import SamplingParams
from semantic_server.engine.service import GenerationParams
from semantic_server.request_outcome import Outcome
from semantic_server.server_context import ServerContext
from semantic_server.swap_result import SwapMode

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results"
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
FILLER = (
    "The archive holds letters, maps and ledgers from the trading houses of the old port. "
    "Each box is labelled with a year, a family name and the ship that carried the goods. "
)


@dataclass
class Turn:
    text: str
    ttft: float
    cached: int
    prompt: int
    generated: int = 0


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "blas": blas_status().detail,
    }


def away_model(quick: bool) -> tuple[str, dict[str, Any]]:
    """The model a swap goes to, and the Harness settings that make it available.

    A full run swaps to Gemma. A quick run is a smoke test of the script: it swaps to
    SmolLM2 under another name (a symlinked directory), which loads in about a second where
    Gemma's first load takes seven.
    """
    if not quick:
        return GEMMA, {}
    alias = Path(tempfile.mkdtemp(prefix="semantic-exp-models-")) / f"{SMOLLM2}-away"
    alias.symlink_to(ROOT / "models" / SMOLLM2)
    return alias.name, {"extra_models": [str(alias)]}


def history(agent: int, tokens: int) -> str:
    """A distinct text of roughly ``tokens`` tokens (about 4 characters a token)."""
    head = f"Agent {agent} keeps these notes. "
    return head + (FILLER * (tokens * 4 // len(FILLER) + 1))[: tokens * 4]


class Harness:
    def __init__(self, model: str = SMOLLM2, make_generator: GeneratorFactory = batch_generator,
                 **settings: Any) -> None:
        self.cache_dir = Path(tempfile.mkdtemp(prefix="semantic-exp-"))
        self.settings = Settings(model=model, models_dir=ROOT / "models",
                                 cache_dir=self.cache_dir, **settings)
        self.loop = asyncio.new_event_loop()
        self.server: ServerContext = self.run(start_server(self.settings,
                                                           make_generator=make_generator))

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    async def _turn(self, agent: str | None, messages: list[dict[str, str]] | str,
                    max_tokens: int, model: str | None = None) -> Turn:
        params = GenerationParams(max_tokens=max_tokens, sampling=SamplingParams())
        text = []
        async for item in self.server.service.generate(agent, messages, params, model):
            if isinstance(item, Outcome):
                return Turn("".join(text), item.ttft_seconds or 0.0, item.cached_tokens,
                            item.prompt_tokens, item.completion_tokens)
            if isinstance(item, str):
                text.append(item)
        raise RuntimeError("the generation ended without an outcome")

    def turn(self, agent: str | None, messages: list[dict[str, str]],
             max_tokens: int = 8) -> Turn:
        return self.run(self._turn(agent, messages, max_tokens))

    def turns(self, requests: list[tuple[str | None, list[dict[str, str]]]],
              max_tokens: int = 8, models: list[str | None] | None = None) -> list[Turn]:
        """Several agents' turns at once (continuous batching), each on its model (a
        ``base:adapter`` names an adapter) or, by default, on the serving one."""
        named = models or [None] * len(requests)

        async def all_turns() -> list[Turn]:
            return await asyncio.gather(*(self._turn(a, m, max_tokens, model) for (a, m), model
                                          in zip(requests, named, strict=True)))
        return self.run(all_turns())

    def swap(self, model_id: str, mode: SwapMode = SwapMode.SEQUENTIAL) -> dict[str, Any]:
        """Swap in process; sequential unless asked (EXP-011..013 measure the eight steps)."""
        result = self.run(self.server.orchestrator.swap(model_id, 600, mode)).as_dict()
        if result["status"] != "success":
            raise RuntimeError(f"swap to {model_id} failed: {result['message']}")
        return result

    def close(self) -> None:
        self.run(stop_server(self.server))
        self.loop.close()


def arguments(description: str, more: Callable[[argparse.ArgumentParser], None] | None = None,
              ) -> argparse.Namespace:
    """The options every experiment takes (--quick for a smoke run, --results for where),
    plus any ``more`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few repetitions, short contexts")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    if more is not None:
        more(parser)
    return parser.parse_args()


def write_results(name: str, data: dict[str, Any], results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    data = {"experiment": name, "machine": machine(), "written_at": time.time(), **data}
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path
