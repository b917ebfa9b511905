"""Each agent's KV cache between its requests.

An agent's cache is *hot* (resident, holding blocks of the BlockPool) between its turns
and *checked out* while a request of that agent runs (the batch owns it then). When hot
caches outgrow the budget the least recently used agents leave memory. Only the engine
thread calls this class, so it needs no lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from semantic_server.cache.block_pool import BlockPool

log = logging.getLogger(__name__)


@dataclass
class AgentCache:
    """One agent's cache: per-layer mlx-lm cache objects and the tokens they hold."""

    agent_id: str
    layers: list[Any]
    tokens: list[int] = field(default_factory=list)


class AgentCacheStore:
    """Hot agent caches within the KV budget of a BlockPool."""

    def __init__(self, pool: BlockPool,
                 on_evict: Callable[[AgentCache], None] | None = None):
        self.pool = pool
        self._hot: dict[str, AgentCache] = {}
        # Where an evicted cache goes; None drops it (the swap issue writes it to disk).
        self._on_evict = on_evict

    def checkout(self, agent_id: str) -> AgentCache | None:
        """Take the agent's cache out of the pool for a request (None: no cache here)."""
        entry = self._hot.pop(agent_id, None)
        self.pool.release(agent_id)
        return entry

    def checkin(self, entry: AgentCache) -> None:
        """Make ``entry`` hot again, evicting least recently used agents to fit it."""
        victims = self.pool.victims_for(len(entry.tokens))
        if victims is None:
            log.warning("cache of %d tokens exceeds the whole KV budget; not kept",
                        len(entry.tokens))
            self._evict(entry)
            return
        for agent_id in victims:
            self._evict(self._hot.pop(agent_id))
            self.pool.release(agent_id)
        self._hot[entry.agent_id] = entry
        self.pool.allocate(entry.agent_id, len(entry.tokens))

    def _evict(self, entry: AgentCache) -> None:
        if self._on_evict is not None:
            self._on_evict(entry)

    def evict_all(self) -> list[str]:
        """Every hot cache leaves memory (a swap's evict step); returns the agent ids."""
        agents = self.pool.agents()
        for agent_id in agents:
            self._evict(self._hot.pop(agent_id))
            self.pool.release(agent_id)
        return agents

    def hot_agents(self) -> dict[str, int]:
        """Resident agents and their token counts, least recently used first."""
        return {agent_id: len(self._hot[agent_id].tokens) for agent_id in self.pool.agents()}
