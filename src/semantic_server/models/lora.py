"""LoRA layers prepared once per model load, whose adapter weights are copied in place.

When a model loads, every module that one of its adapters targets is wrapped, once, in a
:class:`SlottedLoRALinear` sized for the largest rank among them: a stack of ``slots``
adapter weight pairs, slot 0 all zero ("no adapter"). Changing adapter then never rebuilds
the model: the new adapter's ``lora_a`` and ``scale * lora_b`` are copied into a free slot
(zero-filled up to the prepared rank), a few milliseconds of array copies instead of a
reload of seconds. The layers stay unfused (``y = x W + (x A) B``), so each row of a batch
can use its own slot: requests of different adapters decode in one batch, and a request
keeps the adapter it was admitted with while a swap loads another into a different slot.

Which slot each row uses is set per forward pass on the shared :class:`SlotRouting` (see
``engine/adapter_rows.py``): ``None`` skips the adapter arithmetic entirely (a batch with
no adapter costs what the base model costs), one integer applies a single slot to the whole
batch (two plain matmuls), a per-row array gathers each row's pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from semantic_server.errors import AdapterIncompatible, AdapterInvalid
from semantic_server.models.adapters import CONFIG, WEIGHTS, Adapter, AdapterKind
from semantic_server.models.fingerprint import weights_fingerprint


@dataclass
class SlotRouting:
    """The adapter slot of each row of the forward pass under way (engine thread only)."""

    rows: int | mx.array | None = None

    def use(self, slots: list[int]) -> None:
        """Route the next forward pass: ``slots[i]`` is row i's slot (0: no adapter)."""
        if not any(slots):
            self.rows = None
        elif all(slot == slots[0] for slot in slots):
            self.rows = slots[0]
        else:
            self.rows = mx.array(slots)


class SlottedLoRALinear(nn.Module):
    """A linear layer plus a stack of LoRA pairs, one per slot, chosen per batch row."""

    def __init__(self, linear: nn.Module, slots: int, rank: int, routing: SlotRouting) -> None:
        super().__init__()
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        self.linear = linear
        dtype = mx.float32 if isinstance(linear, nn.QuantizedLinear) else linear.weight.dtype
        self.lora_a = mx.zeros((slots, in_dims, rank), dtype=dtype)
        self.lora_b = mx.zeros((slots, rank, out_dims), dtype=dtype)  # scale folded in
        self._routing = routing  # private: not a parameter, not saved

    @property
    def dims(self) -> tuple[int, int]:
        """(input, output) features."""
        return self.lora_a.shape[1], self.lora_b.shape[2]

    def write(self, slot: int, lora_a: mx.array, lora_b: mx.array, scale: float) -> None:
        """Copy one adapter's pair into ``slot``, zero-filled to the prepared rank."""
        rank = lora_a.shape[1]
        a = mx.zeros(self.lora_a.shape[1:], self.lora_a.dtype)
        b = mx.zeros(self.lora_b.shape[1:], self.lora_b.dtype)
        a[:, :rank] = lora_a.astype(a.dtype)
        b[:rank] = (scale * lora_b).astype(b.dtype)
        self.lora_a[slot] = a
        self.lora_b[slot] = b

    def clear(self, slot: int) -> None:
        """Zeros in ``slot``: an adapter that does not adapt this layer."""
        self.lora_a[slot] = mx.zeros(self.lora_a.shape[1:], self.lora_a.dtype)
        self.lora_b[slot] = mx.zeros(self.lora_b.shape[1:], self.lora_b.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        rows = self._routing.rows
        if rows is None:
            return y
        if isinstance(rows, int):  # one slot for the batch: two plain matmuls
            z = (x @ self.lora_a[rows]) @ self.lora_b[rows]
        else:  # each row its slot's pair, gathered inside the matmul (no copies of them)
            z = mx.gather_mm(mx.gather_mm(x, self.lora_a, rhs_indices=rows), self.lora_b,
                             rhs_indices=rows)
        return y + z.astype(y.dtype)


@dataclass
class PreparedLora:
    """A model's prepared adapter layers: what adapters it can take, and their slots."""

    rank: int
    slots: int  # including slot 0, "no adapter"
    layers: dict[str, SlottedLoRALinear]
    routing: SlotRouting = field(default_factory=SlotRouting)

    def incompatibility(self, adapter: Adapter, model_id: str) -> str | None:
        """Why ``adapter`` cannot go into these layers, or None when it can."""
        if adapter.base_model != model_id:
            return f"it was trained on {adapter.base_model!r}, not {model_id!r}"
        if adapter.kind is not AdapterKind.LORA:
            return f"it is {adapter.kind}; the prepared layers are lora"
        if adapter.rank > self.rank:
            return (f"its rank {adapter.rank} is larger than the prepared rank {self.rank} "
                    f"(raise SEMANTIC_LORA_MAX_RANK and reload the model)")
        missing = [m for m in adapter.modules if m not in self.layers]
        if missing:
            return (f"it adapts {missing[0]}, which the model was not prepared for (the "
                    f"model loaded before this adapter existed: reload the model)")
        for module, in_dims, out_dims in adapter.shapes:
            if self.layers[module].dims != (in_dims, out_dims):
                return (f"{module} is {in_dims}x{out_dims} in the adapter and "
                        f"{self.layers[module].dims[0]}x{self.layers[module].dims[1]} in "
                        f"the model")
        return None

    def check(self, adapter: Adapter, model_id: str) -> None:
        """A 422 naming why ``adapter`` does not fit these layers, if it does not."""
        reason = self.incompatibility(adapter, model_id)
        if reason is not None:
            raise AdapterIncompatible(f"adapter {adapter.name!r} cannot be used on "
                                      f"{model_id!r}: {reason}")

    def write(self, slot: int, adapter: Adapter) -> None:
        """Copy ``adapter``'s weights into ``slot`` of every prepared layer (engine thread);
        the layers it does not adapt get zeros there. Files that changed since the adapter
        was checked (its caches are tagged with the fingerprint it had then) or that cannot
        be read are an AdapterInvalid, and the slot is left to be overwritten."""
        if not 0 < slot < self.slots:
            raise ValueError(f"slot {slot} is not an adapter slot")
        try:
            if weights_fingerprint(adapter.path, CONFIG) != adapter.fingerprint:
                raise AdapterInvalid(f"adapter {adapter.name!r} changed on disk since it was "
                                     f"checked: name it again")
            weights = mx.load(str(adapter.path / WEIGHTS))
            for name, layer in self.layers.items():
                if name in adapter.modules:
                    layer.write(slot, weights[f"{name}.lora_a"], weights[f"{name}.lora_b"],
                                adapter.scale)
                else:
                    layer.clear(slot)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise AdapterInvalid(f"adapter {adapter.name!r} cannot be read: {exc}") from exc
        mx.eval([[layer.lora_a, layer.lora_b] for layer in self.layers.values()])

    @property
    def nbytes(self) -> int:
        return sum(layer.lora_a.nbytes + layer.lora_b.nbytes for layer in self.layers.values())


def check_adapter(lora: PreparedLora | None, adapter: Adapter, model_id: str) -> None:
    """A 422 naming why ``adapter`` cannot run on ``model_id``, whose prepared layers are
    ``lora`` (None: it loaded with none), if it cannot."""
    if lora is None:
        raise AdapterIncompatible(
            f"model {model_id!r} was loaded with no adapter layers (no adapter for it "
            f"existed then): swap to it again to prepare them")
    lora.check(adapter, model_id)


def _plan(adapters: list[Adapter], model_id: str, max_rank: int | None,
          ) -> tuple[dict[str, tuple[int, int]], int]:
    """The modules to prepare, with their (in, out), and the rank: those that ``adapters``
    trained on ``model_id`` target, and their largest rank (or ``max_rank``)."""
    usable = [a for a in adapters if a.base_model == model_id and a.kind is AdapterKind.LORA]
    shapes = {module: (in_dims, out_dims) for adapter in usable
              for module, in_dims, out_dims in adapter.shapes}
    rank = max_rank if max_rank is not None else max((a.rank for a in usable), default=0)
    return shapes, rank


def prepared_bytes(adapters: list[Adapter], model_id: str, slots: int,
                   max_rank: int | None = None, dtype_bytes: int = 4) -> int:
    """What :func:`prepare_lora` will add to ``model_id``'s memory (for a preflight)."""
    shapes, rank = _plan(adapters, model_id, max_rank)
    return sum(slots * rank * (i + o) * dtype_bytes for i, o in shapes.values()) if rank > 0 else 0


def prepare_lora(model: Any, adapters: list[Adapter], model_id: str, slots: int,
                 max_rank: int | None = None) -> PreparedLora | None:
    """Wrap every module that ``adapters`` (those trained on ``model_id``) target, once,
    for the largest rank among them or ``max_rank``; None when there is nothing to
    prepare (no adapter for this model, or ``max_rank`` 0)."""
    shapes, rank = _plan(adapters, model_id, max_rank)
    modules = sorted(shapes)
    if not modules or rank <= 0:
        return None
    named = dict(model.named_modules())
    routing = SlotRouting()
    layers: dict[str, SlottedLoRALinear] = {}
    for name in modules:
        linear = named.get(name)
        if not isinstance(linear, nn.Linear | nn.QuantizedLinear):
            continue  # an adapter naming it fails its compatibility check instead
        layers[name] = SlottedLoRALinear(linear, slots, rank, routing)
    if not layers:
        return None
    model.update_modules(tree_unflatten(list(layers.items())))
    mx.eval([[layer.lora_a, layer.lora_b] for layer in layers.values()])
    return PreparedLora(rank, slots, layers, routing)
