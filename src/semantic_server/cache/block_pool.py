"""The KV memory budget: one budget in bytes, shared by every resident model.

Holders are counted in whole blocks of ``block_tokens`` tokens, and a block's bytes follow
from its model's dims (a sliding-window layer never holds more than its window, which
``ModelDims.cache_bytes`` accounts for). Sizes are kept in bytes so that caches of models
with different geometry (the old and the new model during a zero-downtime swap, or several
resident models) share one budget.

Two kinds of holders share it: *hot* agent caches between turns (evictable, least recently
used first) and *reservations* that cannot be evicted: a running job holds one for its
prompt plus its max_tokens, and each model's anonymous prefix cache holds one for its bytes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

from semantic_server.models.dims import ModelDims


class BlockPool:
    """Which agents' caches are resident, what running jobs reserve, and who is least
    recently used."""

    def __init__(self, budget_bytes: int, block_tokens: int) -> None:
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the KV budget and block_tokens must be positive")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._held: OrderedDict[Hashable, int] = OrderedDict()  # hot cache -> bytes, LRU first
        self._reserved: dict[Hashable, int] = {}  # job (or a prefix cache) -> bytes

    def block_bytes(self, dims: ModelDims) -> int:
        """Bytes of one block of a model with these dims."""
        return dims.bytes_per_token * self.block_tokens

    def bytes_for(self, dims: ModelDims, tokens: int) -> int:
        """The bytes ``tokens`` of a model with ``dims`` hold, in whole blocks."""
        block = self.block_bytes(dims)
        return math.ceil(dims.cache_bytes(tokens) / block) * block

    @property
    def used(self) -> int:
        """Bytes of hot agent caches."""
        return sum(list(self._held.values()))  # a copy: reports read it from other threads

    @property
    def reserved(self) -> int:
        """Bytes reserved by running jobs and the prefix caches."""
        return sum(list(self._reserved.values()))

    @property
    def free(self) -> int:
        return self.budget_bytes - self.used - self.reserved

    def agents(self) -> list[Hashable]:
        """Keys of the resident caches, least recently used first."""
        return list(self._held)

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit once every hot cache is evicted."""
        return nbytes <= self.budget_bytes - self.reserved

    def victims_for(self, need: int) -> list[Hashable] | None:
        """The LRU caches that must leave for ``need`` bytes to fit; None if they do not
        fit even with every hot cache gone."""
        if not self.fits(need):
            return None
        victims, free = [], self.free
        for key, nbytes in self._held.items():
            if free >= need:
                break
            victims.append(key)
            free += nbytes
        return victims

    def allocate(self, key: Hashable, need: int) -> None:
        """Hold ``need`` bytes for ``key`` as most recently used (the caller made room)."""
        self._held.pop(key, None)
        if need > self.free:
            raise RuntimeError(f"{need} bytes do not fit in {self.free} free")
        self._held[key] = need

    def release(self, key: Hashable) -> None:
        self._held.pop(key, None)

    def reserve(self, key: Hashable, nbytes: int) -> None:
        """Hold ``nbytes`` for ``key`` beyond eviction (the caller evicted what it could; a
        lone job larger than the budget may overdraw it)."""
        self._reserved[key] = nbytes

    def reservation(self, key: Hashable) -> int:
        return self._reserved.get(key, 0)

    def unreserve(self, key: Hashable) -> None:
        self._reserved.pop(key, None)
