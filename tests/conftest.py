"""Shared fixtures: the real imported models and their GGUF sources.

Tests that need a real model fail loudly when it is missing (run `make test`, which
fetches and imports them); they never skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import semantic_server  # noqa: F401  (loads OpenBLAS before anything imports mlx)

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
GGUF_DIR = ROOT / ".cache" / "models"
SMOLLM2 = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
GGUF_FILES = {SMOLLM2: "SmolLM2-135M-Instruct.Q4_1.gguf", GEMMA: "gemma-3-270m-q4_k_m.gguf"}


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/fetch_models (make test does)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def models_dir() -> Path:
    for model_id in GGUF_FILES:
        _require(MODELS_DIR / model_id / "config.json")
    return MODELS_DIR


@pytest.fixture(scope="session")
def gguf_path():
    def path(model_id: str) -> Path:
        return _require(GGUF_DIR / GGUF_FILES[model_id])

    return path


# The real tier's slowest files (about a minute or more each, measured in CI), started
# first: with two workers taking files in order, the long ones then overlap instead of
# one of them running alone at the end.
SLOW_FIRST = ("test_coding_agents.py", "test_swap_durability.py", "test_shared_store.py",
              "test_import_reference.py", "test_experiments_smoke.py", "test_swap.py",
              "test_resident_models.py", "test_lora_adapters.py", "test_observability.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the items file by file, slowest files first (stable within a file)."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)
