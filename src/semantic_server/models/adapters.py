"""LoRA adapters in mlx-lm's format, found on disk and checked before anything uses them.

An adapter is a folder under ``SEMANTIC_ADAPTERS_DIR`` holding ``adapter_config.json``
(what ``mlx_lm.lora`` writes: ``fine_tune_type``, ``num_layers``, ``lora_parameters`` with
``rank``, ``scale`` and optional ``keys``, and the base ``model`` it was trained on) and
``adapters.safetensors`` (the ``lora_a`` / ``lora_b`` matrices, and DoRA's magnitudes
``m``). Reading one needs no MLX: the config is JSON and the safetensors header is JSON
too, so a listing never loads a weight. Everything that would make an adapter unusable
(not LoRA, shapes that disagree with the rank, another base) is found here and named in
the error, before a swap could touch a model. The fingerprint covers the weights and the
config, so a cache made under one adapter is never mistaken for another's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from semantic_server.errors import AdapterInvalid, AdapterNotFound
from semantic_server.models.catalog import NAME_RULE, is_name, quoted
from semantic_server.models.fingerprint import weights_fingerprint
from semantic_server.models.weight_count import read_header

log = logging.getLogger(__name__)
CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors header larger than this is not an adapter's


class AdapterKind(StrEnum):
    LORA = "lora"
    DORA = "dora"


@dataclass(frozen=True)
class Adapter:
    """A usable adapter: what it was trained on and the shape of its layers."""

    name: str
    path: Path
    base_model: str  # the model id of the base it was trained on
    kind: AdapterKind
    rank: int
    scale: float
    keys: tuple[str, ...] | None  # the target modules; None: mlx-lm's defaults
    num_layers: int  # the last layers it adapts (-1: all)
    modules: tuple[str, ...]  # the adapted modules, from the weights
    shapes: tuple[tuple[str, int, int], ...]  # (module, in, out) of each adapted module
    fingerprint: str

    @property
    def key(self) -> str:
        """Which adapter, down to its weights: what a cache tag records."""
        return f"{self.name}@{self.fingerprint}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's header: tensor name -> dtype, shape and offsets."""
    try:
        header = read_header(path, MAX_HEADER_BYTES)
    except ValueError as exc:
        raise AdapterInvalid(str(exc)) from exc
    header.pop("__metadata__", None)
    return header


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterInvalid(f"{CONFIG} is missing") from None
    except ValueError as exc:
        raise AdapterInvalid(f"{CONFIG} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterInvalid(f"{CONFIG} is not a JSON object")
    return config


def _base_model(config: dict[str, Any]) -> str:
    """The base's model id: the one our training script records, else the last part of
    the path ``mlx_lm.lora`` was given."""
    recorded = (config.get("semantic_base") or {}).get("model_id")
    if isinstance(recorded, str) and recorded:
        return recorded
    if isinstance(config.get("model"), str) and config["model"]:
        return Path(config["model"]).name
    raise AdapterInvalid(f"{CONFIG} does not name the base model it was trained on")


def _modules(header: dict[str, Any], kind: AdapterKind, rank: int,
             ) -> tuple[tuple[str, int, int], ...]:
    """The adapted modules as (name, in, out), with every lora_a (in, rank) and lora_b
    (rank, out) checked."""
    leaves = {"lora_a", "lora_b"} | ({"m"} if kind is AdapterKind.DORA else set())
    modules: dict[str, set[str]] = {}
    dims: dict[str, dict[str, int]] = {}
    for name, info in header.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in leaves or not module:
            raise AdapterInvalid(f"{WEIGHTS} holds {name!r}, which is not a {kind} weight")
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and all(isinstance(d, int) for d in shape)):
            raise AdapterInvalid(f"{WEIGHTS}: {name!r} has no valid shape")
        if (leaf == "lora_a" and (len(shape) != 2 or shape[1] != rank)) or (
                leaf == "lora_b" and (len(shape) != 2 or shape[0] != rank)):
            raise AdapterInvalid(f"{WEIGHTS}: {name!r} has shape {shape}, which does not "
                                 f"match rank {rank}")
        modules.setdefault(module, set()).add(leaf)
        if leaf in ("lora_a", "lora_b"):
            dims.setdefault(module, {})[leaf] = shape[0] if leaf == "lora_a" else shape[1]
    if not modules:
        raise AdapterInvalid(f"{WEIGHTS} holds no adapter weights")
    incomplete = sorted(m for m, have in modules.items() if not {"lora_a", "lora_b"} <= have)
    if incomplete:
        raise AdapterInvalid(f"{WEIGHTS}: {incomplete[0]} lacks lora_a or lora_b")
    return tuple((m, dims[m]["lora_a"], dims[m]["lora_b"]) for m in sorted(modules))


def read_adapter(path: Path) -> Adapter:
    """The adapter in folder ``path``, or AdapterInvalid naming what is wrong with it."""
    config = _config(path)
    kind_name = config.get("fine_tune_type", "lora")
    if kind_name == "full":
        raise AdapterInvalid("a full fine-tune is a model, not an adapter: import it as one")
    try:
        kind = AdapterKind(kind_name)
    except ValueError:
        raise AdapterInvalid(f"fine_tune_type {kind_name!r} is not lora or dora") from None
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterInvalid(f"{CONFIG} has no lora_parameters")
    rank, scale, keys = params.get("rank"), params.get("scale"), params.get("keys")
    if not (isinstance(rank, int) and rank > 0):
        raise AdapterInvalid(f"lora_parameters.rank must be a positive integer, not {rank!r}")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise AdapterInvalid(f"lora_parameters.scale must be a number, not {scale!r}")
    if keys is not None and not (isinstance(keys, list)
                                 and all(isinstance(k, str) for k in keys)):
        raise AdapterInvalid("lora_parameters.keys must be a list of module names")
    num_layers = config.get("num_layers", -1)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise AdapterInvalid(f"num_layers must be an integer, not {num_layers!r}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterInvalid(f"{WEIGHTS} is missing")
    shapes = _modules(_header(weights), kind, rank)
    return Adapter(path.name, path, _base_model(config), kind, rank, float(scale),
                   tuple(keys) if keys is not None else None, num_layers,
                   tuple(m for m, _, _ in shapes), shapes, weights_fingerprint(path, CONFIG))


@dataclass(frozen=True)
class AdapterListing:
    """One folder of the adapters folder: its adapter, or why it cannot be used."""

    name: str
    adapter: Adapter | None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        if self.adapter is None:
            return {"name": self.name, "valid": False, "error": self.error}
        return {**self.adapter.as_dict(), "valid": True}


class AdapterCatalog:
    """The adapters under one folder. Reads the disk on every call (a listing is a few
    small JSON files): call it off the event loop."""

    def __init__(self, adapters_dir: Path) -> None:
        self.adapters_dir = Path(adapters_dir)

    def available(self) -> list[AdapterListing]:
        if not self.adapters_dir.is_dir():
            return []
        listings = []
        for path in sorted(p for p in self.adapters_dir.iterdir() if p.is_dir()):
            if not is_name(path.name):  # no request could name it
                listings.append(AdapterListing(path.name, None, f"the folder's name is not an "
                                               f"adapter name: that is {NAME_RULE}"))
                continue
            try:
                listings.append(AdapterListing(path.name, read_adapter(path)))
            except (AdapterInvalid, OSError) as exc:
                log.warning("adapter %s is unusable: %s", path.name, exc)
                listings.append(AdapterListing(path.name, None, str(exc)))
        return listings

    def resolve(self, name: str) -> Adapter:
        """The adapter called ``name``: 404 if there is none, 422 if it is unusable. The
        name comes from a client: it is checked before it touches a path, and the disk
        refusing it (too long, unreadable) is a 404 too, never a 500."""
        if not is_name(name):
            raise AdapterNotFound(f"adapter {quoted(str(name))} does not exist: an adapter "
                                  f"name is {NAME_RULE}")
        path = self.adapters_dir / name
        try:
            found = path.is_dir()
        except OSError as exc:
            raise AdapterNotFound(f"adapter {name!r} cannot be found: {exc.strerror}") from None
        if not found:
            raise AdapterNotFound(f"adapter {name!r} does not exist")
        try:
            return read_adapter(path)
        except AdapterInvalid as exc:
            raise AdapterInvalid(f"adapter {name!r}: {exc}") from exc
        except OSError as exc:
            raise AdapterInvalid(f"adapter {name!r} cannot be read: {exc}") from exc
