"""Each agent's KV cache between its requests: hot in memory, cold on disk.

An agent's cache is *hot* (resident, holding blocks of the BlockPool) between its turns,
*checked out* while a request of that agent runs (the batch owns it then), and *cold*
(a safetensors file) once it has been evicted: by the LRU policy when hot caches outgrow
the KV budget, by a swap, or at shutdown. A cold cache comes back on the agent's next
request, but only under the tag it was written with (or, with ``reuse="dims"``, under
any tag of the same shape); anything else is rejected with a logged, counted reason.
Only the engine thread calls this class, so it needs no lock.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import (
    TAG_FILE,
    CacheFileError,
    CacheTag,
    agent_file_name,
    read_cache,
    read_summary,
    read_tag_file,
    write_cache,
)
from semantic_server.errors import CacheWriteError

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"


@dataclass
class AgentCache:
    """One agent's cache: per-layer mlx-lm cache objects and the tokens they hold."""

    agent_id: str
    layers: list[Any]
    tokens: list[int] = field(default_factory=list)


class AgentCacheStore:
    def __init__(self, pool: BlockPool, cache_dir: Path | None = None, reuse: str = "exact",
                 disk_budget_bytes: int | None = None) -> None:
        self.pool = pool
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.reuse = reuse
        self.disk_budget_bytes = disk_budget_bytes
        self.tag: CacheTag | None = None
        self.lookups: Counter[str] = Counter()  # hot / disk / miss / rejected
        self.write_failures = 0
        self._hot: dict[str, AgentCache] = {}
        self._remove_partial_writes()

    def _remove_partial_writes(self) -> None:
        """A process killed mid-write leaves a temporary file, never a cache file: drop it."""
        if self.cache_dir is not None and self.cache_dir.exists():
            for leftover in self.cache_dir.glob("*/.*.tmp.*"):
                leftover.unlink(missing_ok=True)

    # ---- tag -------------------------------------------------------------------------
    def retag(self, tag: CacheTag) -> None:
        """Serve caches of ``tag`` from now on (the pool must be empty: evict first)."""
        if self._hot:
            raise RuntimeError("retag needs every hot cache evicted first")
        self.tag = tag

    def _path(self, tag: CacheTag, agent_id: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / tag.digest / agent_file_name(agent_id)

    # ---- hot <-> checked out ---------------------------------------------------------
    def checkout(self, agent_id: str) -> AgentCache | None:
        """The agent's cache for a request: hot if resident, else from disk, else None."""
        entry = self._hot.pop(agent_id, None)
        self.pool.release(agent_id)
        if entry is not None:
            self.lookups["hot"] += 1
            return entry
        entry = self._load_cold(agent_id)
        self.lookups["disk" if entry else "miss"] += 1
        return entry

    def checkin(self, entry: AgentCache) -> None:
        """Make ``entry`` hot again, evicting least recently used agents to fit it."""
        victims = self.pool.victims_for(len(entry.tokens))
        if victims is None:
            log.warning("a cache of %d tokens exceeds the whole KV budget: written to disk",
                        len(entry.tokens))
            self._spill(entry)
            return
        for agent_id in victims:
            self._evict(agent_id)
        self._hot[entry.agent_id] = entry
        self.pool.allocate(entry.agent_id, len(entry.tokens))

    def evict_all(self) -> list[str]:
        """Every hot cache to disk, then out of memory (a swap's evict step, and shutdown).

        All or nothing: if any write fails (a full disk), every cache stays hot and
        CacheWriteError is raised, so a swap can give up before it unloads anything
        instead of losing agents' context. The files that were written are valid either way.
        """
        agents = self.pool.agents()
        failures = []
        for agent_id in agents:
            try:
                self._write(self._hot[agent_id])
            except Exception as exc:
                failures.append(f"{exc}")
        if failures:
            raise CacheWriteError(f"{len(failures)} of {len(agents)} agent caches could not be "
                                  f"written to {self.cache_dir}: {failures[0]}")
        for agent_id in agents:
            del self._hot[agent_id]
            self.pool.release(agent_id)
        return agents

    def _evict(self, agent_id: str) -> None:
        """Out of memory and out of the pool, whatever happens to the write: the KV budget
        holds even on a full disk, at the cost of this agent's newest context."""
        entry = self._hot.pop(agent_id, None)
        self.pool.release(agent_id)
        if entry is not None:
            self._spill(entry)

    def _spill(self, entry: AgentCache) -> None:
        try:
            self._write(entry)
        except Exception as exc:  # logged and counted, never fatal
            log.error("could not write the cache of an agent: %s", exc)

    # ---- disk ------------------------------------------------------------------------
    def _write(self, entry: AgentCache) -> None:
        """Write one cache atomically; a failure leaves any older file of it untouched."""
        if self.cache_dir is None or self.tag is None:
            return
        try:
            write_cache(self._path(self.tag, entry.agent_id), self.tag, entry.agent_id,
                        entry.layers, entry.tokens)
        except Exception:
            self.write_failures += 1
            raise
        self._enforce_disk_budget()

    def _candidates(self, agent_id: str) -> list[Path]:
        assert self.tag is not None
        exact = self._path(self.tag, agent_id)
        paths = [exact] if exact.exists() else []
        if self.reuse == "dims":
            for tag_file in self.cache_dir.glob(f"*/{TAG_FILE}"):
                other = tag_file.parent / agent_file_name(agent_id)
                if other == exact or not other.exists():
                    continue
                tag = read_tag_file(tag_file.parent)
                if tag is not None and tag.shape_key() == self.tag.shape_key():
                    paths.append(other)
        return sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)

    def _load_cold(self, agent_id: str) -> AgentCache | None:
        if self.cache_dir is None or self.tag is None:
            return None
        for path in self._candidates(agent_id):
            try:
                loaded = read_cache(path)
                self._check(loaded.tag, loaded.agent_id, agent_id)
            except CacheFileError as exc:
                self.lookups["rejected"] += 1
                log.warning("cache file %s rejected: %s", path.name, exc)
                self._quarantine(path, str(exc))
                continue
            return AgentCache(agent_id, loaded.layers, loaded.tokens)
        return None

    def _check(self, tag: CacheTag, file_agent: str, agent_id: str) -> None:
        if file_agent != agent_id:
            raise CacheFileError("the file belongs to another agent")
        if tag == self.tag:
            return
        if tag.shape_key() != self.tag.shape_key():
            raise CacheFileError(
                f"dims differ: file has {tag.n_layers} layers x {tag.n_kv_heads} KV heads x "
                f"{tag.head_dim} ({tag.kv_dtype}), model {self.tag.model_id} has "
                f"{self.tag.n_layers} x {self.tag.n_kv_heads} x {self.tag.head_dim} "
                f"({self.tag.kv_dtype})")
        if self.reuse != "dims":
            raise CacheFileError(f"written by other weights ({tag.model_id} "
                                 f"{tag.fingerprint}); set SEMANTIC_CACHE_REUSE=dims to reuse")

    def _quarantine(self, path: Path, reason: str) -> None:
        target = self.cache_dir / QUARANTINE
        target.mkdir(parents=True, exist_ok=True)
        name = f"{path.parent.name}-{path.stem}-{int(time.time() * 1000)}"
        try:
            shutil.move(str(path), target / f"{name}.safetensors")
            (target / f"{name}.reason.txt").write_text(reason + "\n")
        except OSError as exc:
            log.error("could not quarantine %s: %s", path, exc)

    def cold_files(self) -> list[Path]:
        """Every cache file on disk, quarantine excluded."""
        if self.cache_dir is None or not self.cache_dir.exists():
            return []
        return [p for p in self.cache_dir.glob("*/*.safetensors")
                if p.parent.name != QUARANTINE and not p.name.startswith(".")]

    def _enforce_disk_budget(self) -> None:
        if self.disk_budget_bytes is None:
            return
        files = sorted(self.cold_files(), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files[:-1]:  # never the newest: it was just written
            if total <= self.disk_budget_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)

    # ---- reports ---------------------------------------------------------------------
    def hot_agents(self) -> dict[str, int]:
        """Resident agents and their token counts, least recently used first."""
        return {agent_id: len(self._hot[agent_id].tokens) for agent_id in self.pool.agents()}

    def cold_agents(self) -> list[dict[str, Any]]:
        """Every cold cache on disk, from the files' headers (a file that cannot be read is
        left for the next request of its agent to reject)."""
        summaries = []
        for path in self.cold_files():
            try:
                summaries.append(read_summary(path))
            except Exception as exc:  # any damage: reported, not fatal
                log.warning("unreadable cache file %s: %s", path.name, exc)
        return summaries

    def residency(self) -> dict[str, int]:
        """Hot and cold counts and bytes; safe to call from another thread (copies first)."""
        hot = [len(entry.tokens) for entry in list(self._hot.values())]
        cold = []
        for path in self.cold_files():
            try:
                cold.append(path.stat().st_size)
            except FileNotFoundError:  # deleted by the disk budget meanwhile
                continue
        dims = self.pool.dims
        return {"hot_agents": len(hot), "cold_agents": len(cold),
                "hot_bytes": sum(dims.cache_bytes(n) for n in hot) if dims else 0,
                "cold_bytes": sum(cold)}
