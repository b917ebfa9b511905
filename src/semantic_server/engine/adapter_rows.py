"""Which adapter slot each row of a batch uses, kept by mlx-lm's own batch bookkeeping.

mlx-lm's BatchGenerator merges, extends, filters, splits and extracts the per-sequence
caches of its batches as sequences join and leave. A model with prepared LoRA layers gets
one more "layer" at the end of every sequence's cache: an :class:`AdapterRow` holding the
sequence's adapter slot. The generator moves it with the sequence through every one of
those operations, like any layer of KV, so at each forward pass the last entry of the
batch cache lists the slot of every row, in row order, whatever the generator did.
:class:`RoutedModel` reads it, points the LoRA layers at those slots and runs the model
on the real layers. The engine appends the row when a sequence enters the generator and
strips it from every cache that comes out, so nothing else ever sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import make_prompt_cache

from semantic_server.models.lora import PreparedLora


@dataclass
class AdapterRow:
    """One sequence's adapter slot (0: no adapter), as a cache layer of its own."""

    slot: int = 0

    @classmethod
    def merge(cls, rows: list[AdapterRow]) -> AdapterRows:
        return AdapterRows([row.slot for row in rows])

    @property
    def state(self) -> list[Any]:
        return []

    nbytes = 0


@dataclass
class AdapterRows:
    """The slots of a batch's rows, in row order (the batch form of AdapterRow)."""

    slots: list[int] = field(default_factory=list)
    nbytes = 0

    @property
    def state(self) -> list[Any]:
        return []

    def prepare(self, **_: Any) -> None:
        """Padding changes no row's slot."""

    def finalize(self) -> None:
        """Nothing to finish: a slot is not padded."""

    def filter(self, keep: list[int]) -> None:
        self.slots = [self.slots[i] for i in keep]

    def extend(self, other: AdapterRows) -> None:
        self.slots.extend(other.slots)

    def extract(self, idx: int) -> AdapterRow:
        return AdapterRow(self.slots[idx])


def with_row(cache: list[Any], slot: int) -> list[Any]:
    """A sequence's cache as a routed generator takes it."""
    return [*cache, AdapterRow(slot)]


def without_row(cache: list[Any]) -> list[Any]:
    """A cache out of a routed generator, as everything else takes it."""
    if not cache or not isinstance(cache[-1], AdapterRow | AdapterRows):
        raise RuntimeError("a routed cache lost its adapter row")
    return cache[:-1]


class RoutedModel:
    """The model as a routed generator sees it: each forward pass is routed by the slots
    in its cache's last entry."""

    def __init__(self, model: Any, lora: PreparedLora) -> None:
        self.model = model
        self.lora = lora

    def __call__(self, inputs: Any, cache: list[Any] | None = None, **kwargs: Any) -> Any:
        if cache is None:  # not a batch: no adapter
            return self.model(inputs, **kwargs)
        rows = cache[-1]
        if not isinstance(rows, AdapterRows) or len(rows.slots) != inputs.shape[0]:
            raise RuntimeError("a routed batch's adapter rows are out of step with its rows")
        self.lora.routing.use(rows.slots)
        try:
            return self.model(inputs, cache=cache[:-1], **kwargs)
        finally:
            self.lora.routing.rows = None

    def make_cache(self) -> list[Any]:
        return with_row(make_prompt_cache(self.model), 0)

    def __getattr__(self, name: str) -> Any:  # layers, args...: the model's own
        return getattr(self.model, name)
