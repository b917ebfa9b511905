"""The KV memory budget, counted in blocks of ``block_tokens`` tokens.

Counting blocks instead of bytes keeps the arithmetic integral and makes "how many
agents fit" easy to read off. A block's bytes follow from the model's dims, so a swap
reconfigures the pool; its byte budget stays the same. A sliding-window layer never holds
more than its window, which ``ModelDims.cache_bytes`` accounts for.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from semantic_server.models.dims import ModelDims


class BlockPool:
    """Which agents' caches are resident, their blocks, and who is least recently used."""

    def __init__(self, budget_bytes: int, block_tokens: int, dims: ModelDims | None = None) -> None:
        """A pool sized for ``dims``; without dims it holds nothing until ``reconfigure``."""
        if budget_bytes <= 0 or block_tokens <= 0:
            raise ValueError("the KV budget and block_tokens must be positive")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._held: OrderedDict[str, int] = OrderedDict()  # agent -> blocks, LRU first
        self.dims: ModelDims | None = None
        self.block_bytes = 0
        self.capacity = 0
        if dims is not None:
            self.reconfigure(dims)

    def reconfigure(self, dims: ModelDims) -> None:
        """Size blocks for ``dims``; only an empty pool can change model (the swap evicts)."""
        if self._held:
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
        return sum(list(self._held.values()))  # a copy: reports read it from other threads

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def agents(self) -> list[str]:
        """Resident agents, least recently used first."""
        return list(self._held)

    def victims_for(self, tokens: int) -> list[str] | None:
        """The LRU agents that must leave for a cache of ``tokens`` to fit; None if it never
        fits in the budget."""
        need = self.blocks_for(tokens)
        if need > self.capacity:
            return None
        victims, free = [], self.free
        for agent, blocks in self._held.items():
            if free >= need:
                break
            victims.append(agent)
            free += blocks
        return victims

    def allocate(self, agent_id: str, tokens: int) -> None:
        """Hold blocks for ``agent_id`` as most recently used (caller made room first)."""
        need = self.blocks_for(tokens)
        self._held.pop(agent_id, None)
        if need > self.free:
            raise RuntimeError(f"{need} blocks do not fit in {self.free} free")
        self._held[agent_id] = need

    def release(self, agent_id: str) -> None:
        self._held.pop(agent_id, None)
