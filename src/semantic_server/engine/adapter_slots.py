"""Which adapters occupy a model's prepared LoRA slots, and which jobs use them.

A resident model has a fixed number of adapter slots (``SEMANTIC_LORA_SLOTS``; slot 0 is
"no adapter" and never changes). A job takes the slot of its adapter when it starts and
gives it back when it ends; an adapter not in a slot is copied into a free one, or into
the least recently used slot no running job uses. A slot in use is never overwritten,
which is what keeps every request on the adapter version it was admitted with: a swap to
another adapter fills another slot while the old one's jobs finish. When every slot is in
use by running jobs, a job of yet another adapter waits for one to come free. Only the
engine thread uses this class.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from semantic_server.errors import AdapterSlotsBusy
from semantic_server.models.adapters import Adapter

NO_ADAPTER = 0


@dataclass(frozen=True)
class SlotLoad:
    """An adapter copied into a slot, and how long the copy took."""

    slot: int
    seconds: float
    copied: bool  # False: it was already there


class AdapterSlots:
    def __init__(self, slots: int, write: Callable[[int, Adapter], None]) -> None:
        """``slots`` counts slot 0; ``write(slot, adapter)`` copies an adapter's weights."""
        self.slots = slots
        self._write = write
        self._held: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, LRU first
        self._users: Counter[int] = Counter()
        self.loads = 0  # adapters copied into a slot

    def slot_of(self, adapter: Adapter | None) -> int | None:
        """The slot holding ``adapter`` now, if one does."""
        return NO_ADAPTER if adapter is None else self._held.get(adapter.key)

    def can_take(self, adapter: Adapter | None) -> bool:
        """Whether a job of ``adapter`` could start now (its adapter is in a slot, or a slot
        is free for it)."""
        return self.slot_of(adapter) is not None or self._free_slot() is not None

    def _free_slot(self) -> int | None:
        held = set(self._held.values())
        empty = next((s for s in range(1, self.slots) if s not in held), None)
        if empty is not None:
            return empty
        return next((slot for slot in self._held.values() if not self._users[slot]), None)

    def load(self, adapter: Adapter) -> SlotLoad:
        """Put ``adapter`` in a slot (if it is not in one) without taking it;
        AdapterSlotsBusy when every slot is in use."""
        started = time.perf_counter()
        slot = self._held.get(adapter.key)
        if slot is not None:
            self._held.move_to_end(adapter.key)
            return SlotLoad(slot, time.perf_counter() - started, copied=False)
        slot = self._free_slot()
        if slot is None:
            raise AdapterSlotsBusy(f"all {self.slots - 1} adapter slots are in use by "
                                   f"running requests; retry when one ends", retry_after=1)
        for key in [k for k, s in self._held.items() if s == slot]:
            del self._held[key]  # gone before the copy: a failed copy leaves no stale entry
        self._write(slot, adapter)
        self._held[adapter.key] = slot
        self.loads += 1
        return SlotLoad(slot, time.perf_counter() - started, copied=True)

    def take(self, adapter: Adapter | None) -> int:
        """The slot a starting job of ``adapter`` uses, copied in if need be; held until
        :meth:`give_back`."""
        slot = NO_ADAPTER if adapter is None else self.load(adapter).slot
        self._users[slot] += 1
        return slot

    def give_back(self, slot: int) -> None:
        self._users[slot] -= 1
        if self._users[slot] <= 0:
            del self._users[slot]

    def resident(self) -> dict[str, int]:
        """Adapter key -> slot, least recently used first."""
        return dict(self._held)
