"""The KV memory budget, counted in blocks of ``block_tokens`` tokens.

Counting blocks instead of bytes keeps the arithmetic integral and makes "how many
agents fit" easy to read off. A block's bytes follow from the model's dims, so a swap
reconfigures the pool; its byte budget stays the same. A sliding-window layer never holds
more than its window, which ``ModelDims.cache_bytes`` accounts for.

Two kinds of holders share the budget: *hot* agent caches between turns (evictable, least
recently used first) and *reservations* that cannot be evicted: a running job holds one
for its prompt plus its max_tokens, and the anonymous prefix cache holds one for its bytes.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from semantic_server.models.dims import ModelDims


class BlockPool:
    """Which agents' caches are resident, what running jobs reserve, and who is least
    recently used."""

    def __init__(self, budget_bytes: int, block_tokens: int, dims: ModelDims | None = None) -> None:
        """A pool sized for ``dims``; without dims it holds nothing until ``reconfigure``."""
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the KV budget and block_tokens must be positive")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._held: OrderedDict[str, int] = OrderedDict()  # agent -> blocks, LRU first
        self._reserved: dict[str, int] = {}  # job (or the prefix cache) -> blocks
        self.dims: ModelDims | None = None
        self.block_bytes = 0
        self.capacity = 0
        if dims is not None:
            self.reconfigure(dims)

    def reconfigure(self, dims: ModelDims) -> None:
        """Size blocks for ``dims``; only an empty pool can change model (the swap evicts)."""
        if self._held or self._reserved:
            raise RuntimeError("reconfigure needs an empty pool: evict every agent first")
        self.dims = dims
        self.block_bytes = dims.bytes_per_token * self.block_tokens
        self.capacity = self.budget_bytes // self.block_bytes

    def blocks_for(self, tokens: int) -> int:
        if self.dims is None:
            raise RuntimeError("the pool has no model dims yet")
        return math.ceil(self.dims.cache_bytes(tokens) / self.block_bytes)

    @property
    def used(self) -> int:
        """Blocks of hot agent caches."""
        return sum(list(self._held.values()))  # a copy: reports read it from other threads

    @property
    def reserved(self) -> int:
        """Blocks reserved by running jobs and the prefix cache."""
        return sum(list(self._reserved.values()))

    @property
    def free(self) -> int:
        return self.capacity - self.used - self.reserved

    def agents(self) -> list[str]:
        """Resident agents, least recently used first."""
        return list(self._held)

    def fits(self, blocks: int) -> bool:
        """Whether ``blocks`` fit once every hot cache is evicted."""
        return blocks <= self.capacity - self.reserved

    def victims_for(self, need: int) -> list[str] | None:
        """The LRU agents that must leave for ``need`` blocks to fit; None if they do not
        fit even with every hot cache gone."""
        if not self.fits(need):
            return None
        victims, free = [], self.free
        for agent, blocks in self._held.items():
            if free >= need:
                break
            victims.append(agent)
            free += blocks
        return victims

    def allocate(self, agent_id: str, need: int) -> None:
        """Hold ``need`` blocks for ``agent_id`` as most recently used (the caller made
        room first)."""
        self._held.pop(agent_id, None)
        if need > self.free:
            raise RuntimeError(f"{need} blocks do not fit in {self.free} free")
        self._held[agent_id] = need

    def release(self, agent_id: str) -> None:
        self._held.pop(agent_id, None)

    def reserve(self, key: str, blocks: int) -> None:
        """Hold ``blocks`` for ``key`` beyond eviction (the caller evicted what it could; a
        lone job larger than the budget may overdraw it)."""
        self._reserved[key] = blocks

    def reservation(self, key: str) -> int:
        return self._reserved.get(key, 0)

    def unreserve(self, key: str) -> None:
        self._reserved.pop(key, None)

    def blocks_for_bytes(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.block_bytes) if self.block_bytes else 0
