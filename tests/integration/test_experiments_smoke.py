"""The experiment scripts run end to end (their --quick form) and write their results.

A smoke test of the scripts only: no timing is asserted here; the figures live in the
JSON the full runs write (``make experiments``). The quick runs swap to SmolLM2 under
another name instead of Gemma (the scripts' paths are the same, the loads take a second),
and go side by side, one per core.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Two of the scripts, one per core: EXP-014 (our server as a process, swaps, a restart)
# and EXP-013 (the in-process harness, swaps, restores). EXP-011 and EXP-012 run the same
# harness paths; their smoke runs left the suite to keep `make test` near ten minutes
# (`make experiments` runs them all).
EXPERIMENTS = {
    "exp014_agents_round_trip": ("servers", "targets"),
    "exp013_cache_restore": ("rows",),
}


@pytest.fixture(scope="module")
def quick_runs(models_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("quick-results")

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", f"experiments.{name}", "--quick", "--results", str(results)],
            cwd=ROOT, capture_output=True, text=True, timeout=900)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        completed = dict(zip(EXPERIMENTS, pool.map(run, EXPERIMENTS), strict=True))
    return results, completed


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_quick_run(name, quick_runs):
    results, completed = quick_runs
    run = completed[name]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((results / f"{name}.json").read_text())
    for key in EXPERIMENTS[name]:
        assert data[key] not in (None, [], {}), key
    assert (results / f"{name}.png").stat().st_size > 10_000
