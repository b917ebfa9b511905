"""Each agent's KV cache between its requests: hot in memory, cold on disk.

An agent's cache is *hot* (resident, holding blocks of the BlockPool) between its turns,
*checked out* while a request of that agent runs (the batch owns it then), and *cold*
(a safetensors file) once it has been evicted: by the LRU policy when hot caches outgrow
the KV budget, by a swap, or at shutdown. A cold cache comes back on the agent's next
request, but only under the tag it was written with (or, with ``CacheReuse.DIMS``, under
any tag of the same shape); anything else is rejected with a logged, counted reason.

The files on disk are indexed in memory (one scan at startup, then kept up to date by every
write and deletion), so reports and the disk budget never rescan the folder. Only the
engine thread changes this class, so it needs no lock; reports copy before reading.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import (
    TAG_FILE,
    AgentCache,
    CacheFileError,
    CacheReadError,
    CacheTag,
    agent_file_name,
    estimated_file_bytes,
    read_cache,
    read_summary,
    read_tag_file,
    write_cache,
)
from semantic_server.config import CacheReuse
from semantic_server.errors import CacheWriteError

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"
QUARANTINE_KEPT = 32  # rejected files kept for inspection; older ones are deleted


class Lookup(StrEnum):
    """Where an agent's cache came from when its request started."""

    HOT = "hot"
    DISK = "disk"
    MISS = "miss"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Residency:
    """How many agent caches are hot and cold, and their bytes."""

    hot_agents: int
    hot_bytes: int
    cold_agents: int
    cold_bytes: int


def _mtime(path: Path) -> float:
    """A file's modification time; 0 for one deleted meanwhile (its read will miss)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class AgentCacheStore:
    def __init__(self, pool: BlockPool, cache_dir: Path, reuse: CacheReuse = CacheReuse.EXACT,
                 disk_budget_bytes: int | None = None) -> None:
        self.pool = pool
        self.cache_dir = Path(cache_dir)
        self.reuse = CacheReuse(reuse)
        self.disk_budget_bytes = disk_budget_bytes
        self.tag: CacheTag | None = None
        self.lookups: Counter[Lookup] = Counter()
        self.write_failures = 0
        self.read_failures = 0  # transient: the file could not be read then, and stayed
        self.disk_deletions = 0  # cold caches deleted to keep within the disk budget
        self._hot: dict[str, AgentCache] = {}
        self._cold: dict[Path, tuple[int, float]] = self._scan()  # path -> (bytes, mtime)

    def _scan(self) -> dict[Path, tuple[int, float]]:
        """Index the cache files on disk; drop what a process killed mid-write left."""
        index: dict[Path, tuple[int, float]] = {}
        if not self.cache_dir.exists():
            return index
        for leftover in self.cache_dir.glob("*/.*.tmp.*"):
            leftover.unlink(missing_ok=True)
        for path in self.cache_dir.glob("*/*.safetensors"):
            if path.parent.name != QUARANTINE and not path.name.startswith("."):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                index[path] = (stat.st_size, stat.st_mtime)
        return index

    # ---- tag -------------------------------------------------------------------------
    def retag(self, tag: CacheTag) -> None:
        """Serve caches of ``tag`` from now on (the pool must be empty: evict first)."""
        if self._hot:
            raise RuntimeError("retag needs every hot cache evicted first")
        self.tag = tag

    def _path(self, tag: CacheTag, agent_id: str) -> Path:
        return self.cache_dir / tag.digest / agent_file_name(agent_id)

    # ---- hot <-> checked out ---------------------------------------------------------
    def checkout(self, agent_id: str) -> AgentCache | None:
        """The agent's cache for a request: hot if resident, else from disk, else None."""
        entry = self._hot.pop(agent_id, None)
        self.pool.release(agent_id)
        if entry is not None:
            self.lookups[Lookup.HOT] += 1
            return entry
        entry = self._load_cold(agent_id)
        self.lookups[Lookup.DISK if entry else Lookup.MISS] += 1
        return entry

    def checkin(self, entry: AgentCache) -> None:
        """Make ``entry`` hot again, evicting least recently used agents to fit it (its
        checkpoint too, when it has one; if only the cache itself fits, the checkpoint goes)."""
        need = self._blocks(entry)
        if entry.checkpoint is not None and not self.pool.fits(need):
            entry.checkpoint = None
            need = self._blocks(entry)
        victims = self.pool.victims_for(need)
        if victims is None:
            log.warning("a cache of %d tokens does not fit in the KV budget beside the "
                        "running requests: written to disk", len(entry.tokens))
            self._spill(entry)
            return
        for agent_id in victims:
            self._evict(agent_id)
        self._hot[entry.agent_id] = entry
        self.pool.allocate(entry.agent_id, need)

    def _blocks(self, entry: AgentCache) -> int:
        checkpoint = entry.checkpoint
        return self.pool.blocks_for(len(entry.tokens)) + (
            self.pool.blocks_for(len(checkpoint[1])) if checkpoint else 0)

    def fits(self, tokens: int) -> bool:
        """Whether a job of ``tokens`` fits beside what running jobs reserved."""
        return self.pool.fits(self.pool.blocks_for(tokens))

    def reserve(self, key: str, tokens: int) -> None:
        """Reserve room for a running job of ``tokens`` (its prompt plus max_tokens)."""
        self._reserve(key, self.pool.blocks_for(tokens))

    def room_bytes(self, key: str) -> int:
        """Bytes free for ``key``'s reservation without evicting anyone."""
        held = self.pool.reservation(key)
        return max(0, (self.pool.free + held) * self.pool.block_bytes)

    def reserve_bytes(self, key: str, nbytes: int) -> None:
        """Reserve room for a holder counted in bytes (the anonymous prefix cache), which
        the caller made fit ``room_bytes``: nobody is evicted for it."""
        self.pool.reserve(key, self.pool.blocks_for_bytes(nbytes))

    def _reserve(self, key: str, blocks: int) -> None:
        """Evict least recently used hot caches to disk until ``blocks`` fit. What does not
        fit beside the other reservations overdraws the budget: the engine starts such a
        job only when no other job runs (``fits`` tells it when to wait)."""
        victims = self.pool.victims_for(blocks)
        for agent_id in victims if victims is not None else self.pool.agents():
            self._evict(agent_id)
        self.pool.reserve(key, blocks)

    def unreserve(self, key: str) -> None:
        self.pool.unreserve(key)

    def evict_all(self) -> list[str]:
        """Every hot cache to disk, then out of memory (a swap's evict step, and shutdown).

        All or nothing: room is made under the disk budget first (deleting the oldest
        *other* cold caches, never one this call writes), and if any write fails (a full
        disk) every cache stays hot and CacheWriteError is raised, so a swap can give up
        before it unloads anything instead of losing agents' context.
        """
        agents = self.pool.agents()
        entries = [self._hot[agent_id] for agent_id in agents]
        self._make_room(entries)
        failures = []
        for entry in entries:
            try:
                self._write(entry)
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
            self._make_room([entry])
            self._write(entry)
        except Exception as exc:  # logged and counted, never fatal
            log.error("could not write the cache of an agent: %s", exc)

    # ---- disk ------------------------------------------------------------------------
    def _write(self, entry: AgentCache) -> None:
        """Write one cache atomically; a failure leaves any older file of it untouched."""
        if self.tag is None:
            raise CacheWriteError("no cache tag yet: no model was ever loaded")
        path = self._path(self.tag, entry.agent_id)
        try:
            size = write_cache(path, self.tag, entry)
        except Exception:
            self.write_failures += 1
            raise
        self._cold[path] = (size, time.time())

    def _make_room(self, entries: list[AgentCache]) -> None:
        """Delete the oldest cold caches, other than these agents' own, until ``entries``
        fit the disk budget; a CacheWriteError (nothing deleted) when they cannot."""
        if self.disk_budget_bytes is None or self.tag is None:
            return
        mine = {self._path(self.tag, entry.agent_id) for entry in entries}
        need = sum(estimated_file_bytes(self.tag, entry) for entry in entries)
        others = sorted((p for p in self._cold if p not in mine), key=lambda p: self._cold[p][1])
        kept = sum(self._cold[p][0] for p in others)
        if need > self.disk_budget_bytes:
            self.write_failures += len(entries)
            raise CacheWriteError(f"{len(entries)} agent caches need about {need} bytes; the "
                                  f"disk budget is {self.disk_budget_bytes} bytes")
        for path in others:
            if kept + need <= self.disk_budget_bytes:
                break
            kept -= self._cold[path][0]
            self._delete(path, "the disk budget needs room")

    def _delete(self, path: Path, reason: str) -> None:
        self._cold.pop(path, None)
        path.unlink(missing_ok=True)
        self.disk_deletions += 1
        log.info("cold cache deleted", extra={"fields": {"file": path.name, "reason": reason}})

    def _candidates(self, agent_id: str) -> list[Path]:
        assert self.tag is not None
        exact = self._path(self.tag, agent_id)
        paths = [exact] if exact.exists() else []
        if self.reuse is CacheReuse.DIMS:
            for tag_file in self.cache_dir.glob(f"*/{TAG_FILE}"):
                other = tag_file.parent / agent_file_name(agent_id)
                if other == exact or not other.exists():
                    continue
                tag = read_tag_file(tag_file.parent)
                if tag is not None and tag.shape_key() == self.tag.shape_key():
                    paths.append(other)
        return sorted(paths, key=_mtime, reverse=True)

    def _load_cold(self, agent_id: str) -> AgentCache | None:
        if self.tag is None:
            return None
        for path in self._candidates(agent_id):
            try:
                entry = read_cache(path)
                self._check(entry, agent_id)
            except CacheReadError as exc:  # transient: a miss now, the file stays for later
                self.read_failures += 1
                log.warning("cache file %s not read: %s", path.name, exc)
                continue
            except CacheFileError as exc:
                self.lookups[Lookup.REJECTED] += 1
                log.warning("cache file %s rejected: %s", path.name, exc)
                self._quarantine(path, str(exc))
                continue
            return entry
        return None

    def _check(self, entry: AgentCache, agent_id: str) -> None:
        tag = entry.tag
        assert tag is not None and self.tag is not None
        if entry.agent_id != agent_id:
            raise CacheFileError("the file belongs to another agent")
        if tag == self.tag:
            return
        if tag.shape_key() != self.tag.shape_key():
            raise CacheFileError(
                f"dims differ: file has {tag.n_layers} layers x {tag.n_kv_heads} KV heads x "
                f"{tag.head_dim} ({tag.kv_dtype}), model {self.tag.model_id} has "
                f"{self.tag.n_layers} x {self.tag.n_kv_heads} x {self.tag.head_dim} "
                f"({self.tag.kv_dtype})")
        if self.reuse is not CacheReuse.DIMS:
            raise CacheFileError(f"written by other weights ({tag.model_id} "
                                 f"{tag.fingerprint}); set SEMANTIC_CACHE_REUSE=dims to reuse")

    def _quarantine(self, path: Path, reason: str) -> None:
        """Move a rejected file aside with its reason; keep only the newest few."""
        self._cold.pop(path, None)
        target = self.cache_dir / QUARANTINE
        target.mkdir(parents=True, exist_ok=True)
        name = f"{path.parent.name}-{path.stem}-{int(time.time() * 1000)}"
        try:
            shutil.move(str(path), target / f"{name}.safetensors")
            (target / f"{name}.reason.txt").write_text(reason + "\n")
        except OSError as exc:
            log.error("could not quarantine %s: %s", path, exc)
        kept = sorted(target.glob("*.safetensors"), key=lambda p: p.name.rsplit("-", 1)[-1])
        for old in kept[:-QUARANTINE_KEPT]:
            old.unlink(missing_ok=True)
            old.with_suffix(".reason.txt").unlink(missing_ok=True)

    def cold_files(self) -> list[Path]:
        """Every cache file on disk, quarantine excluded (from the index, oldest first)."""
        index = dict(self._cold)
        return sorted(index, key=lambda p: index[p][1])

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

    def residency(self) -> Residency:
        """Hot and cold counts and bytes; safe to call from another thread (copies first)."""
        hot = [len(tokens) for entry in list(self._hot.values())
               for tokens in (entry.tokens, entry.checkpoint[1] if entry.checkpoint else [])
               if tokens]
        cold = [size for size, _ in list(self._cold.values())]
        dims = self.pool.dims
        return Residency(len(self._hot), sum(dims.cache_bytes(n) for n in hot) if dims else 0,
                         len(cold), sum(cold))
