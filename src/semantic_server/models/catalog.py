"""Which models this server can load, and where each one's files are.

A model id is either the name of a directory under ``models_dir`` (what the GGUF importer
writes), a local MLX directory named in ``extra_models`` (its id is the directory name),
or a Hugging Face repo id in ``extra_models`` resolved through the local HF cache; a repo
missing from the cache is downloaded only when the hub is reachable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from semantic_server.errors import ModelInvalid, ModelNotFound


class ModelSource(StrEnum):
    """Where a model's files come from."""

    IMPORTED = "imported"  # a directory under models_dir (what the GGUF importer writes)
    LOCAL = "local"  # a local MLX directory named in extra_models
    HUGGINGFACE = "huggingface"  # a hub repo id in extra_models


@dataclass(frozen=True)
class CatalogEntry:
    model_id: str
    source: ModelSource
    path: Path | None  # None: a hub repo not in the local cache yet


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _hf_cached(repo_id: str, local_only: bool) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            repo_id, local_files_only=local_only,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"]))
    except Exception:  # any hub or cache failure means: not available here
        return None


class ModelCatalog:
    """The list of loadable models; scanned on each call so new imports show up at once."""

    def __init__(self, models_dir: Path, extra_models: list[str] | tuple[str, ...] = ()) -> None:
        self.models_dir = Path(models_dir)
        self.extra_models = tuple(extra_models)

    def available(self) -> list[CatalogEntry]:
        entries: dict[str, CatalogEntry] = {}
        if self.models_dir.is_dir():
            for child in sorted(self.models_dir.iterdir()):
                if not child.name.startswith(".") and _is_model_dir(child):
                    entries[child.name] = CatalogEntry(child.name, ModelSource.IMPORTED, child)
        for spec in self.extra_models:
            local = Path(spec).expanduser()
            if local.is_dir():
                entries.setdefault(local.name, CatalogEntry(local.name, ModelSource.LOCAL, local))
            else:
                entries.setdefault(spec, CatalogEntry(spec, ModelSource.HUGGINGFACE,
                                                      _hf_cached(spec, local_only=True)))
        return list(entries.values())

    def resolve(self, model_id: str) -> Path:
        """The local directory of ``model_id``, downloading a hub repo if it must and can."""
        entry = next((e for e in self.available() if e.model_id == model_id), None)
        if entry is None:
            raise ModelNotFound(f"model {model_id!r} is not available")
        path = entry.path or _hf_cached(model_id, local_only=False)
        if path is None or not _is_model_dir(path):
            raise ModelNotFound(f"model {model_id!r} is not in the local cache and could not be "
                                "downloaded")
        return path

    def read_config(self, model_id: str) -> dict[str, Any]:
        """``config.json`` of ``model_id``; a preflight reads it before anything is loaded."""
        path = self.resolve(model_id) / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelInvalid(f"model {model_id!r} has an unreadable config.json: {exc}") from exc
