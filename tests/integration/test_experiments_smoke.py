"""The experiment scripts run end to end (their --quick form) and write their results.

A smoke test of the scripts only: no timing is asserted here; the figures live in the
JSON the full runs write (``make experiments``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

EXPERIMENTS = {
    "exp011_memory_reclamation": ("swaps", "within_5_percent"),
    "exp012_swap_latency": ("runs", "summary", "floors_ms"),
    "exp013_cache_restore": ("rows",),
    "exp014_agents_round_trip": ("servers", "targets"),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_quick_run(name, models_dir, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", "--quick", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    for key in EXPERIMENTS[name]:
        assert data[key] not in (None, [], {}), key
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
