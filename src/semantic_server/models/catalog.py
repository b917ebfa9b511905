"""Which models this server can load, and where each one's files are.

A model id is either the name of a directory under ``models_dir`` (what the GGUF importer
writes), a local MLX directory named in ``extra_models`` (its id is the directory name),
or a Hugging Face repo id in ``extra_models`` resolved through the local HF cache; a repo
missing from the cache is downloaded only when the hub is reachable.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from semantic_server.errors import ModelInvalid, ModelNotFound

log = logging.getLogger(__name__)

# What a client may call a model or an adapter, checked before the name goes near a path:
# 1-128 characters of [A-Za-z0-9._-], not starting with a dot (so never "." or ".."), no
# path separator. A hub model id is two such names, owner/name.
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
HUB_ID = re.compile(rf"{NAME.pattern}/{NAME.pattern}")
NAME_RULE = "1-128 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'"


def is_name(name: object) -> bool:
    """Whether ``name`` is one a client may give for a model folder or an adapter."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def is_model_id(model_id: object) -> bool:
    """Whether ``model_id`` is one a client may give: a name, or a hub repo's owner/name."""
    return is_name(model_id) or (isinstance(model_id, str)
                                 and HUB_ID.fullmatch(model_id) is not None)


def quoted(name: str) -> str:
    """A client's name as an error message quotes it: not all of a 4,000-character one."""
    return repr(name if len(name) <= 64 else name[:60] + "...")


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
        """Every model a client can name (a folder whose name no client may give is left
        out, with a warning)."""
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
        for model_id in [m for m in entries if not is_model_id(m)]:
            log.warning("model %s is left out: a model id is %s", quoted(model_id), NAME_RULE)
            del entries[model_id]
        return list(entries.values())

    def resolve(self, model_id: str) -> Path:
        """The local directory of ``model_id``, downloading a hub repo if it must and can;
        a model id no client may give is not found before anything reads the disk."""
        if not is_model_id(model_id):
            raise ModelNotFound(f"model {quoted(str(model_id))} does not exist: a model id is "
                                f"{NAME_RULE} (or a hub repo's owner/name)")
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
