"""Each agent's KV cache between its requests: hot in memory, cold on disk.

An agent's cache is *hot* (resident, holding blocks of the BlockPool) between its turns,
*checked out* while a request of that agent runs (the batch owns it then), and *cold*
(a safetensors file) once it has been evicted: by the LRU policy when hot caches outgrow
the KV budget, by a swap, or at shutdown. A cold cache comes back on the agent's next
request, but only under the tag it was written with (or, with ``CacheReuse.DIMS``, under
any tag of the same shape); anything else is rejected with a logged, counted reason.

Caches are kept per model and adapter: every resident model (the serving one, and during
a zero-downtime swap the one retiring) has its tag here, and an agent's hot cache is keyed
by tag (which names the LoRA adapter it was made under, if any) and agent, so a request
never takes a cache of another model or adapter than the one it runs on. An agent may hold
one cache per adapter, hot or on disk; each comes back when its adapter does.

An LRU spill is written behind (``cache_writer.py``) when the store has a writer: the
engine thread prepares the file and goes on, the writer thread writes it. Until it is on
disk the cache stays in memory as *pending*: the agent's next request takes it from there,
a failed write (after one retry) puts it back hot when it fits, and a swap's evict step or
shutdown first waits for every pending write, so all-or-nothing still holds.

The files on disk are indexed in memory (one scan at startup, then kept up to date by every
write and deletion), so reports and the disk budget never rescan the folder. Only the
engine thread changes this class, so it needs no lock; reports copy before reading.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import (
    TAG_FILE,
    AgentCache,
    CacheFileError,
    CacheReadError,
    CacheTag,
    ChunkDamaged,
    PreparedFile,
    agent_file_name,
    prepare_file,
    private_folder,
    read_cache,
    read_prefix,
    read_summary,
    read_tag_file,
    write_atomically,
    write_prepared,
)
from semantic_server.cache.cache_writer import CacheWriter
from semantic_server.cache.prefix_chunks import CHUNKS, chunk_keys, chunk_path, tenant_of
from semantic_server.cache.restore_policy import RestoreOrRecompute
from semantic_server.cache.shared_store import SharedStore
from semantic_server.config import CHUNK_TOKENS, CacheReuse, DiskFormat
from semantic_server.errors import CacheWriteError
from semantic_server.models.dims import ModelDims

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"
QUARANTINE_KEPT = 32  # rejected files kept for inspection; older ones are deleted
HotKey = tuple[str, str]  # (tag digest, agent id): a hot cache in the pool
# Tokens another agent's cache must share with a prompt to seed it: more than a chat
# template's own header, so what is shared is the deployment's system prompt and tools.
MIN_SHARED_PREFIX = 48


class Lookup(StrEnum):
    """Where an agent's cache came from when its request started."""

    HOT = "hot"
    DISK = "disk"
    MISS = "miss"
    REJECTED = "rejected"
    # a miss while the agent holds a cache made under another adapter of the same model:
    # never used under this one (it comes back when its adapter does)
    OTHER_ADAPTER = "other_adapter"
    # the agent had no cache; it starts from the prefix another agent of its tenant holds
    SHARED_PREFIX = "shared_prefix"
    # its cache is on disk, but prefilling it was expected to be faster than reading it
    RECOMPUTE = "recompute"


@dataclass(frozen=True)
class HotCache:
    """One resident cache, as reports show it."""

    agent_id: str
    tag: CacheTag
    tokens: int
    nbytes: int


@dataclass(frozen=True)
class Residency:
    """How many agent caches are hot and cold, and their bytes."""

    hot_agents: int
    hot_bytes: int
    cold_agents: int
    cold_bytes: int


@dataclass(frozen=True)
class Outgoing:
    """A cache on its way to disk, prepared: its file and the chunk files it lists."""

    agent_id: str
    tokens: int
    path: Path
    prepared: PreparedFile
    chunks: tuple[Path, ...]  # every chunk its file lists
    own_bytes: int  # what its file will take
    new_chunks: dict[Path, int]  # the chunks it writes (not on disk yet), and their bytes

    @property
    def nbytes(self) -> int:
        return self.own_bytes + sum(self.new_chunks.values())


@dataclass(frozen=True)
class Pending:
    """A spilled cache on its way to disk: still in memory until the writer is done."""

    number: int  # its write job's
    entry: AgentCache
    nbytes: int  # what the file will take, for the disk budget
    memory: int  # what it holds in memory meanwhile, for the write-behind bound


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the common prefix, by bisection over slice comparisons (C speed: the
    engine thread compares long prompts with many caches)."""
    low, high = 0, min(len(a), len(b))  # a[:low] == b[:low]; the prefix is at most high
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many cached tokens a prompt reuses: their common prefix, but never the whole
    prompt (the generator needs at least one new token to compute the next logits)."""
    return min(common_prefix(cached, prompt), len(prompt) - 1)


def prefix_copy(layers: list[Any], held: int, keep: int) -> list[Any] | None:
    """A cache of the first ``keep`` of the ``held`` tokens ``layers`` hold, sharing their
    arrays but never writing to them (each copy has its own array objects, and a batch
    makes new arrays from them); None when the rest cannot be cut off (a sliding window
    that has wrapped)."""
    copies = []
    for layer in layers:
        twin = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, mx.array):
                setattr(twin, name, value[...])
        copies.append(twin)
    if held > keep:
        if not can_trim_prompt_cache(copies):
            return None
        trim_prompt_cache(copies, held - keep)
    return copies


def _mtime(path: Path) -> float:
    """A file's modification time; 0 for one deleted meanwhile (its read will miss)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class AgentCacheStore:
    def __init__(self, pool: BlockPool, cache_dir: Path, reuse: CacheReuse = CacheReuse.EXACT,
                 disk_budget_bytes: int | None = None,
                 disk_format: DiskFormat = DiskFormat.NATIVE,
                 writer: CacheWriter | None = None, shared: SharedStore | None = None,
                 chunk_tokens: int | None = CHUNK_TOKENS,
                 write_behind_bytes: int | None = None) -> None:
        """``disk_format``: how the files this store writes hold their KV (it reads every
        format). ``writer``: spills are written behind by it (None: on the caller's
        thread). ``shared``: the Redis store other servers read (its writer writes through
        to it), which this store writes back to at the end of every agent turn.
        ``chunk_tokens``: the size of the content-addressed prefix chunks files keep their
        full-attention KV in (None: whole files). With a shared store files stay whole: a
        Redis value must be a cache on its own. ``write_behind_bytes``: the most memory
        spills may hold while they wait for the writer; a spill beyond it waits for the
        disk (None: no bound)."""
        self.pool = pool
        self.cache_dir = Path(cache_dir)
        self.reuse = CacheReuse(reuse)
        self.disk_budget_bytes = disk_budget_bytes
        self.disk_format = DiskFormat(disk_format)
        self.lookups: Counter[Lookup] = Counter()
        self.write_failures = 0
        self.read_failures = 0  # transient: the file could not be read then, and stayed
        self.disk_deletions = 0  # cold caches deleted to keep within the disk budget
        # digest -> a resident model's tag, dims and how many resident loads share them
        self._models: dict[str, tuple[CacheTag, ModelDims, int]] = {}
        self._hot: dict[HotKey, AgentCache] = {}
        self.chunk_tokens = chunk_tokens if shared is None else None
        self._records: dict[Path, tuple[Path, ...]] = {}  # a cold file -> the chunks it lists
        self._chunks: dict[Path, int] = {}  # chunk files on disk -> their bytes
        self._users: Counter[Path] = Counter()  # chunk -> files on disk or queued listing it
        self._queued: dict[int, Outgoing] = {}  # write jobs not collected yet
        self._tokens: dict[Path, int] = {}  # a cold file -> the tokens it holds
        self.policy = RestoreOrRecompute()
        self._cold: dict[Path, tuple[int, float]] = self._scan()  # path -> (bytes, mtime)
        self.writer = writer
        self.shared = shared
        self.written_back: dict[str, int] = {}  # agent -> its newest write job to Redis
        self._pending: dict[Path, Pending] = {}  # spills the writer has not finished
        self._brought: set[Path] = set()  # files the shared store wrote, not indexed yet
        self.write_behind_bytes = write_behind_bytes
        self.write_behind_waits = 0  # spills that waited for the disk, over the bound

    def _scan(self) -> dict[Path, tuple[int, float]]:
        """Index the cache files and chunks on disk (and which chunks each file lists);
        drop what a process killed mid-write left, and chunks no file lists."""
        index: dict[Path, tuple[int, float]] = {}
        if not self.cache_dir.exists():
            return index
        for leftover in [*self.cache_dir.glob("*/.*.tmp.*"),
                         *self.cache_dir.glob(f"*/{CHUNKS}/.*.tmp.*")]:
            leftover.unlink(missing_ok=True)
        for path in self.cache_dir.glob("*/*.safetensors"):
            if path.parent.name != QUARANTINE and not path.name.startswith("."):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                try:
                    summary = read_summary(path)
                    keys, self._tokens[path] = summary["chunks"], summary["tokens"]
                except Exception:  # left for its agent's next request to reject
                    keys = []
                index[path] = (stat.st_size, stat.st_mtime)
                self._records[path] = tuple(chunk_path(path.parent, key) for key in keys)
                self._users.update(self._records[path])
        for chunk in self.cache_dir.glob(f"*/{CHUNKS}/*.safetensors"):
            if self._users[chunk] == 0:
                chunk.unlink(missing_ok=True)
                continue
            with contextlib.suppress(OSError):
                self._chunks[chunk] = chunk.stat().st_size
        return index

    # ---- models ----------------------------------------------------------------------
    def add_model(self, tag: CacheTag, dims: ModelDims) -> None:
        """Take caches of a newly resident model (its cold caches are found by tag). Two
        resident loads of the same weights (a swap to the model already serving) share
        one tag, and their caches: counted, so the first to leave does not take it."""
        tag = tag.base
        _, _, count = self._models.get(tag.digest, (tag, dims, 0))
        self._models[tag.digest] = (tag, dims, count + 1)

    def remove_model(self, tag: CacheTag) -> None:
        """Forget a model that leaves (its last load evicts its hot caches first)."""
        tag = tag.base
        if tag.digest not in self._models:
            return
        _, dims, count = self._models[tag.digest]
        if count > 1:
            self._models[tag.digest] = (tag, dims, count - 1)
            return
        if any(entry.tag is not None and entry.tag.base == tag for entry in self._hot.values()):
            raise RuntimeError(f"{tag.model_id} still has hot caches: evict them first")
        del self._models[tag.digest]

    def _dims(self, tag: CacheTag) -> ModelDims:
        try:
            return self._models[tag.base.digest][1]
        except KeyError:
            raise RuntimeError(f"{tag.model_id} is not resident in the cache store") from None

    def _path(self, tag: CacheTag, agent_id: str) -> Path:
        return self.cache_dir / tag.digest / agent_file_name(agent_id)

    # ---- hot <-> checked out ---------------------------------------------------------
    def checkout(self, tag: CacheTag, agent_id: str, prompt: list[int] | None = None,
                 ) -> AgentCache | None:
        """The agent's cache for a request on ``tag``'s model: hot if resident, else from
        disk; for an agent with none, the longest prefix of ``prompt`` that another agent
        of its tenant holds hot (see :meth:`shared_prefix`); else None."""
        self.collect()
        key = (tag.digest, agent_id)
        entry = self._hot.pop(key, None)
        self.pool.release(key)
        if entry is not None:
            self.lookups[Lookup.HOT] += 1
            return entry
        pending = self._pending.pop(self._path(tag, agent_id), None)
        if pending is not None:  # evicted, its file still being written: no need to read
            self.lookups[Lookup.DISK] += 1
            return pending.entry
        if self._recompute_pays(tag, agent_id):
            self.lookups[Lookup.RECOMPUTE] += 1
            return None
        entry = self._load_cold(tag, agent_id)
        if entry is not None:
            self.lookups[Lookup.DISK] += 1
        elif (other := self._other_adapter(tag, agent_id)) is not None:
            self.lookups[Lookup.OTHER_ADAPTER] += 1
            log.info("agent cache not used: made under another adapter", extra={"fields": {
                "model": tag.model_id, "adapter": tag.adapter, "cache_adapter": other}})
        elif prompt is not None and (
                entry := self.shared_prefix(tag, prompt, tenant_of(agent_id), agent_id)):
            self.lookups[Lookup.SHARED_PREFIX] += 1
        else:
            self.lookups[Lookup.MISS] += 1
        return entry

    def shared_prefix(self, tag: CacheTag, prompt: list[int], tenant: str | None,
                      agent_id: str = "", longer_than: int = 0) -> AgentCache | None:
        """A new cache for ``agent_id`` holding the longest prefix of ``prompt`` (at least
        MIN_SHARED_PREFIX tokens, never all of it) that a hot cache on ``tag`` of an agent
        of ``tenant`` holds, or that chunks on disk hold: agents of one deployment share
        their system prompt and tools, so a new agent need not prefill them again. The
        caches it comes from stay as they are. Never across tenants, models or adapters
        (the tag names the adapter; a chunk's name, the tenant). Only a prefix of more than
        ``longer_than`` tokens is taken (nothing is read for less)."""
        best, length = None, max(MIN_SHARED_PREFIX - 1, longer_than)
        for (digest, other), entry in self._hot.items():
            if digest == tag.digest and tenant_of(other) == tenant:
                shared = reusable_prefix(entry.tokens, prompt)
                if shared > length:
                    best, length = entry, shared
        keys = self._chunks_on_disk(tag, prompt, tenant)
        if keys and len(keys) * (self.chunk_tokens or 0) > length:
            layers = self._read_prefix(tag, keys)
            if layers is not None:
                held = len(keys) * (self.chunk_tokens or 0)
                return AgentCache(agent_id, layers, prompt[:held], tag)
        if best is None:
            return None
        layers = prefix_copy(best.layers, len(best.tokens), length)
        return AgentCache(agent_id, layers, prompt[:length], tag) if layers else None

    def _chunks_on_disk(self, tag: CacheTag, prompt: list[int], tenant: str | None,
                        ) -> list[str]:
        """The chunks on disk that hold the longest prefix of ``prompt`` (never all of it);
        none for a model with sliding-window layers (their KV is not in chunks)."""
        if (not self.chunk_tokens or not self._chunks
                or any(window is not None for window in tag.layer_windows)):
            return []
        folder = self.cache_dir / tag.digest
        keys = chunk_keys(tag.digest, self.disk_format.value, tenant, prompt,
                          self.chunk_tokens, limit=(len(prompt) - 1) // self.chunk_tokens)
        held = 0
        while held < len(keys) and chunk_path(folder, keys[held]) in self._chunks:
            held += 1
        return keys[:held]

    def _read_prefix(self, tag: CacheTag, keys: list[str]) -> list[Any] | None:
        try:
            return read_prefix(self.cache_dir / tag.digest, tag, self.disk_format, keys,
                               self.chunk_tokens or 0)
        except (CacheReadError, CacheFileError) as exc:  # the agent prefills instead
            self.read_failures += 1
            log.warning("a shared prefix was not read from disk: %s", exc)
            if isinstance(exc, ChunkDamaged):
                self._drop_chunk(exc.path)
            return None

    def _drop_chunk(self, chunk: Path) -> None:
        """Delete a damaged chunk: the files listing it are rejected when read, and the
        next write that lists it makes it again."""
        self._chunks.pop(chunk, None)
        chunk.unlink(missing_ok=True)

    def _other_adapter(self, tag: CacheTag, agent_id: str) -> str | None:
        """The adapter (or "none") of a cache this agent holds, hot or on disk, under
        another adapter of ``tag``'s model; None when it holds none."""
        for (_, agent), entry in self._hot.items():
            if agent == agent_id and entry.tag is not None and entry.tag.base == tag.base:
                return entry.tag.adapter or "none"
        name = agent_file_name(agent_id)
        for path in [p for p in list(self._cold) if p.name == name]:
            theirs = read_tag_file(path.parent)
            if theirs is not None and theirs.base == tag.base and theirs != tag:
                return theirs.adapter or "none"
        return None

    def checkin(self, entry: AgentCache) -> None:
        """Make ``entry`` (whose ``tag`` says which model made it) hot again, evicting least
        recently used caches to fit it (its checkpoint too, when it has one; if only the
        cache itself fits, the checkpoint goes)."""
        need = self._bytes(entry)
        if entry.checkpoint is not None and not self.pool.fits(need):
            entry.checkpoint = None
            need = self._bytes(entry)
        victims = self.pool.victims_for(need)
        if victims is None:
            log.warning("a cache of %d tokens does not fit in the KV budget beside the "
                        "running requests: written to disk", len(entry.tokens))
            self._spill(entry)
            return
        for key in victims:
            self._evict(key)
        key = (self._tag(entry).digest, entry.agent_id)
        self._hot[key] = entry
        self.pool.allocate(key, need)
        if self.shared is not None and self.writer is not None:  # the turn's write-back
            try:
                self._queue(self._prepare(entry))
            except Exception as exc:  # the cache stays hot; other servers see an older one
                self.write_failures += 1
                log.error("an agent's cache was not written back: %s", exc)

    @staticmethod
    def _tag(entry: AgentCache) -> CacheTag:
        if entry.tag is None:
            raise RuntimeError("a cache must carry the tag of the model that made it")
        return entry.tag

    def _bytes(self, entry: AgentCache) -> int:
        dims, checkpoint = self._dims(self._tag(entry)), entry.checkpoint
        return self.pool.bytes_for(dims, len(entry.tokens)) + (
            self.pool.bytes_for(dims, len(checkpoint[1])) if checkpoint else 0)

    def fits(self, tag: CacheTag, tokens: int) -> bool:
        """Whether a job of ``tokens`` on ``tag``'s model fits beside what running jobs
        reserved."""
        return self.pool.fits(self.pool.bytes_for(self._dims(tag), tokens))

    def reserve(self, key: str, tag: CacheTag, tokens: int) -> None:
        """Reserve room for a running job of ``tokens`` (its prompt plus max_tokens) on
        ``tag``'s model. Least recently used hot caches go to disk until it fits; what does
        not fit beside the other reservations overdraws the budget: the engine starts such
        a job only when no other job runs (``fits`` tells it when to wait)."""
        need = self.pool.bytes_for(self._dims(tag), tokens)
        victims = self.pool.victims_for(need)
        for victim in victims if victims is not None else self.pool.agents():
            self._evict(victim)
        self.pool.reserve(key, need)

    def room_bytes(self, key: str) -> int:
        """Bytes free for ``key``'s reservation without evicting anyone."""
        return max(0, self.pool.free + self.pool.reservation(key))

    def reserve_bytes(self, key: str, nbytes: int) -> None:
        """Reserve room for a holder counted in bytes (an anonymous prefix cache), which
        the caller made fit ``room_bytes``: nobody is evicted for it."""
        self.pool.reserve(key, nbytes)

    def unreserve(self, key: str) -> None:
        self.pool.unreserve(key)

    def evict_all(self, tag: CacheTag | None = None) -> list[str]:
        """Every hot cache (of ``tag``'s model, or of all) to disk, then out of memory: a
        swap's evict step, and shutdown. Returns the agents written.

        All or nothing: room is made under the disk budget first (deleting the oldest
        *other* cold caches, never one this call writes), and if any write fails (a full
        disk) every cache stays hot and CacheWriteError is raised, so a swap can give up
        before it unloads anything instead of losing agents' context.
        """
        self.flush()  # spills written behind land first (a failed one is hot again)
        keys = [key for key in self.pool.agents()
                if tag is None or self._tag(self._hot[key]).base == tag.base]
        outgoing: list[Outgoing] = []
        failures = []
        try:
            for key in keys:
                outgoing.append(self._prepare(self._hot[key]))
            self._make_room(outgoing)
            for out in outgoing:
                try:
                    self._write(out)
                except Exception as exc:
                    failures.append(f"{exc}")
        finally:
            for out in outgoing:
                self._let_go(out.chunks)
        if failures:
            raise CacheWriteError(f"{len(failures)} of {len(keys)} agent caches could not be "
                                  f"written to {self.cache_dir}: {failures[0]}")
        for key in keys:
            del self._hot[key]
            self.pool.release(key)
        return [agent_id for _, agent_id in keys]

    def _evict(self, key: HotKey) -> None:
        """Out of memory and out of the pool, whatever happens to the write: the KV budget
        holds even on a full disk, at the cost of this agent's newest context."""
        entry = self._hot.pop(key, None)
        self.pool.release(key)
        if entry is not None:
            self._spill(entry)

    def _spill(self, entry: AgentCache) -> None:
        out = None
        try:
            out = self._prepare(entry)
            self._make_room([out])
            if self.writer is None or self.writer.closed:  # closed: shutting down
                self._write(out)
            else:  # the job holds its chunks from now on
                self._queue(out, pending=entry)
                out = None
        except Exception as exc:  # logged and counted, never fatal
            log.error("could not write the cache of an agent: %s", exc)
        finally:
            if out is not None:
                self._let_go(out.chunks)

    def _prepare(self, entry: AgentCache) -> Outgoing:
        """The MLX part of writing ``entry`` (engine thread); the chunks its file lists are
        held from now on, so none of them is deleted before the file is written (the
        caller lets go of them, or a write job does when it is done)."""
        tag = self._tag(entry)
        path = self._path(tag, entry.agent_id)
        prepared = prepare_file(tag, entry, self.disk_format, self.chunk_tokens,
                                lambda key: chunk_path(path.parent, key) in self._chunks)
        chunks = tuple(chunk_path(path.parent, key) for key in prepared.chunk_keys)
        chunk_bytes = prepared.chunk_bytes() if prepared.to_write else 0  # all alike
        out = Outgoing(entry.agent_id, len(entry.tokens), path, prepared, chunks,
                       prepared.own_bytes(), {chunk_path(path.parent, key): chunk_bytes
                                              for key, _ in prepared.to_write})
        self._users.update(chunks)
        return out

    # ---- write-behind ----------------------------------------------------------------
    def _queue(self, out: Outgoing, pending: AgentCache | None = None) -> None:
        """Queue a prepared file for the writer; a spill (``pending``) stays in memory
        until it is written, once there is room for it behind (``_room_behind``)."""
        assert self.writer is not None
        memory = self._bytes(pending) if pending is not None else 0
        if pending is not None:
            self._room_behind(memory)
        job = self.writer.submit(out.path, out.prepared)
        self._queued[job.number] = out
        if self.shared is not None:
            self.written_back[out.agent_id] = job.number
        if pending is not None:
            self._pending[out.path] = Pending(job.number, pending, out.nbytes, memory)

    def _behind(self) -> list[Pending]:
        """Spills whose write the writer has not finished (safe from another thread)."""
        writer = self.writer
        if writer is None:
            return []
        return [pending for pending in dict(self._pending).values()
                if not writer.finished(pending.number)]

    @property
    def writing_bytes(self) -> int:
        """Memory held by spills waiting for the writer (outside the KV pool)."""
        return sum(pending.memory for pending in self._behind())

    def _room_behind(self, need: int) -> None:
        """Wait (engine thread) until a spill holding ``need`` bytes fits beside the spills
        still waiting for the writer, within ``write_behind_bytes``: when the disk falls
        behind, evictions wait for it as they would without write-behind, and memory stays
        within the KV budget plus the bound. Nothing is collected here (a failed write's
        cache coming back hot would take the room an eviction is making): the engine thread
        collects finished writes when the writer tells it, between steps."""
        assert self.writer is not None
        bound = self.write_behind_bytes

        def over(behind: list[Pending]) -> bool:
            return bound is not None and bool(behind) and \
                sum(pending.memory for pending in behind) + need > bound

        behind = self._behind()
        if over(behind):
            self.write_behind_waits += 1
        while over(behind):
            self.writer.wait(min(pending.number for pending in behind))
            behind = self._behind()

    def collect(self) -> None:
        """Take the writer's results: written files join the index; a file that could not
        be written is counted, and its cache is hot again if it fits (else it is lost, as
        a failed synchronous spill is)."""
        while self.writer is not None and self.writer.done:
            done = self.writer.done.popleft()
            path = done.job.path
            pending = self._pending.get(path)
            current = pending is not None and pending.number == done.job.number
            if current:
                del self._pending[path]
            out = self._queued.pop(done.job.number)
            try:
                if done.size is not None:
                    self._recorded(out, done.size)
                else:
                    self.write_failures += 1
                    log.error("could not write the cache of an agent: %s", done.error)
                    if current and pending is not None:
                        self._back_hot(pending.entry)
            finally:  # the job's hold on its chunks ends with it
                self._let_go(out.chunks)

    def _back_hot(self, entry: AgentCache) -> None:
        key = (self._tag(entry).digest, entry.agent_id)
        need = self._bytes(entry)
        if key in self._hot or need > self.pool.free:
            log.error("an agent's cache was lost: its file could not be written and it "
                      "does not fit in memory beside the others")
            return
        self._hot[key] = entry
        self.pool.allocate(key, need)

    def flush(self) -> None:
        """Wait for every spill written behind (engine thread)."""
        if self.writer is not None:
            self.writer.flush()
            self.collect()

    def close(self) -> None:
        """Write what is queued and stop the writer (at shutdown, after ``evict_all``)."""
        if self.writer is not None:
            self.writer.close()
        if self.shared is not None:
            self.shared.close()

    # ---- the shared store ------------------------------------------------------------
    def refresh(self, tag: CacheTag, agent_id: str) -> bool:
        """Bring the shared copy of the agent's cache into the folder when it is newer
        (holds more tokens: a history only grows) than what this server holds; True when
        this server holds an older copy hot, which the caller must drop (on the engine
        thread) for the newer one to be used. Called off the engine thread before the
        agent's turn, under its lease: this reads the store's indexes only as a hint."""
        if self.shared is None:
            return False
        try:
            return self._refresh(tag, agent_id)
        except Exception as exc:  # the shared store is a help: the turn runs on what is here
            log.warning("the shared copy of an agent's cache was not taken: %s", exc)
            return False

    def _refresh(self, tag: CacheTag, agent_id: str) -> bool:
        assert self.shared is not None
        path = self._path(tag, agent_id)
        remote = self.shared.tokens(path)
        if remote is None or path in self._pending:  # a spill of it is being written
            return False
        hot = self._hot.get((tag.digest, agent_id))
        held = len(hot.tokens) if hot is not None else self._file_tokens(path)
        if remote <= held or (data := self.shared.get(path)) is None:
            return False
        private_folder(path.parent)
        if read_tag_file(path.parent) != tag:
            write_atomically(path.parent / TAG_FILE, lambda tmp: tmp.write_text(tag.to_json()))
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
        self._brought.add(path)  # the engine thread indexes it when it reads it
        log.info("agent cache taken from the shared store", extra={"fields": {
            "model": tag.model_id, "tokens": remote, "held": held}})
        return hot is not None

    @staticmethod
    def _file_tokens(path: Path) -> int:
        try:
            return int(read_summary(path)["tokens"])
        except Exception:  # no file, or one the next read will reject: it holds nothing
            return 0

    def drop_hot(self, tag: CacheTag, agent_id: str) -> None:
        """Forget this server's hot copy of the agent's cache: a newer one is on disk."""
        key = (tag.digest, agent_id)
        if self._hot.pop(key, None) is not None:
            self.pool.release(key)

    # ---- disk ------------------------------------------------------------------------
    def _write(self, out: Outgoing) -> None:
        """Write one cache atomically; a failure leaves any older file of it untouched."""
        try:
            size = write_prepared(out.path, out.prepared)
        except Exception:
            self.write_failures += 1
            raise
        self._recorded(out, size)

    def _recorded(self, out: Outgoing, size: int) -> None:
        """Index a file written (``size`` bytes); the chunks only its older version listed
        are deleted."""
        path, chunks = out.path, out.chunks
        self._brought.discard(path)  # this store's own file, indexed here
        for chunk in chunks:
            if chunk not in self._chunks:
                with contextlib.suppress(OSError):
                    self._chunks[chunk] = chunk.stat().st_size
        self._users.update(chunks)
        self._let_go(self._records.pop(path, ()))
        self._records[path] = chunks
        self._cold[path] = (size, time.time())
        self._tokens[path] = out.tokens

    def _let_go(self, chunks: tuple[Path, ...]) -> None:
        """One holder fewer for each of ``chunks``; a chunk nobody holds is deleted."""
        for chunk in chunks:
            self._users[chunk] -= 1
            if self._users[chunk] <= 0:
                del self._users[chunk]
                self._chunks.pop(chunk, None)
                chunk.unlink(missing_ok=True)

    def _make_room(self, outgoing: list[Outgoing]) -> None:
        """Delete the oldest cold caches, other than these agents' own, until ``outgoing``
        fits the disk budget (a chunk counted once, freed with the last file listing it);
        a CacheWriteError (nothing deleted) when it cannot."""
        if self.disk_budget_bytes is None:
            return
        mine = {out.path for out in outgoing}
        new_chunks = {chunk: nbytes for out in outgoing for chunk, nbytes in out.new_chunks.items()}
        need = sum(out.own_bytes for out in outgoing) + sum(new_chunks.values())
        coming = {p: x.nbytes for p, x in self._pending.items() if p not in mine}
        queued = {out.path for out in self._queued.values()}  # written, maybe not collected
        others = sorted((p for p in self._cold if p not in mine and p not in coming
                         and p not in queued), key=lambda p: self._cold[p][1])
        kept = sum(self._cold[p][0] for p in others) + sum(coming.values()) + sum(
            self._chunks.values())
        if need > self.disk_budget_bytes:
            self.write_failures += len(outgoing)
            raise CacheWriteError(f"{len(outgoing)} agent caches need about {need} bytes; "
                                  f"the disk budget is {self.disk_budget_bytes} bytes")
        users = Counter(self._users)  # the outgoing files hold theirs already
        for path in others:
            if kept + need <= self.disk_budget_bytes:
                break
            kept -= self._cold[path][0]
            for chunk in self._records.get(path, ()):
                users[chunk] -= 1
                kept -= self._chunks.get(chunk, 0) if users[chunk] == 0 else 0
            self._delete(path, "the disk budget needs room")

    def _delete(self, path: Path, reason: str) -> None:
        self._cold.pop(path, None)
        self._tokens.pop(path, None)
        self._let_go(self._records.pop(path, ()))
        path.unlink(missing_ok=True)
        self.disk_deletions += 1
        log.info("cold cache deleted", extra={"fields": {"file": path.name, "reason": reason}})

    def _candidates(self, tag: CacheTag, agent_id: str) -> list[Path]:
        exact = self._path(tag, agent_id)
        paths = [exact] if exact.exists() else []
        if self.reuse is CacheReuse.DIMS:
            for tag_file in self.cache_dir.glob(f"*/{TAG_FILE}"):
                other = tag_file.parent / agent_file_name(agent_id)
                if other == exact or not other.exists():
                    continue
                theirs = read_tag_file(tag_file.parent)
                if (theirs is not None and theirs.shape_key() == tag.shape_key()
                        and theirs.adapter == tag.adapter):
                    paths.append(other)
        return sorted(paths, key=_mtime, reverse=True)

    def _recompute_pays(self, tag: CacheTag, agent_id: str) -> bool:
        """Whether prefilling the agent's cache on disk is expected to be faster than
        reading it (``restore_policy.py``); the file stays either way."""
        path = self._path(tag, agent_id)
        tokens = self._tokens.get(path)
        if tokens is None or path not in self._cold:
            return False
        if self.policy.restore_pays(tag.base.digest, self._disk_bytes(path), tokens):
            return False
        log.info("agent cache on disk not read: prefilling it is faster", extra={
            "fields": {"model": tag.model_id, "tokens": tokens}})
        return True

    def _disk_bytes(self, path: Path) -> int:
        """What reading a cold file reads: the file and every chunk it lists."""
        return self._cold.get(path, (0, 0.0))[0] + sum(
            self._chunks.get(chunk, 0) for chunk in self._records.get(path, ()))

    def _load_cold(self, tag: CacheTag, agent_id: str) -> AgentCache | None:
        for path in self._candidates(tag, agent_id):
            started = time.perf_counter()
            try:
                entry = read_cache(path)
                self._check(entry, tag, agent_id)
            except CacheReadError as exc:  # transient: a miss now, the file stays for later
                self.read_failures += 1
                log.warning("cache file %s not read: %s", path.name, exc)
                continue
            except CacheFileError as exc:
                self.lookups[Lookup.REJECTED] += 1
                log.warning("cache file %s rejected: %s", path.name, exc)
                if isinstance(exc, ChunkDamaged):
                    self._drop_chunk(exc.path)
                self._quarantine(path, str(exc))
                continue
            if path not in self._cold or path in self._brought:  # the shared store's (whole)
                self._brought.discard(path)
                self._let_go(self._records.pop(path, ()))  # an older, chunked file's chunks
                with contextlib.suppress(OSError):
                    self._cold[path] = (path.stat().st_size, _mtime(path))
                    self._records[path] = ()
                    self._tokens[path] = len(entry.tokens)
            self.policy.read(self._disk_bytes(path), time.perf_counter() - started)
            return replace(entry, tag=tag)  # hot from now on: it belongs to this model
        return None

    def _check(self, entry: AgentCache, tag: CacheTag, agent_id: str) -> None:
        theirs = entry.tag
        assert theirs is not None
        if entry.agent_id != agent_id:
            raise CacheFileError("the file belongs to another agent")
        if theirs == tag:
            return
        if theirs.adapter != tag.adapter:  # never reused across adapters, whatever the reuse
            raise CacheFileError(f"made under adapter {theirs.adapter or 'none'}, not "
                                 f"{tag.adapter or 'none'}")
        if theirs.shape_key() != tag.shape_key():
            raise CacheFileError(
                f"dims differ: file has {theirs.n_layers} layers x {theirs.n_kv_heads} KV "
                f"heads x {theirs.head_dim} ({theirs.kv_dtype}), model {tag.model_id} has "
                f"{tag.n_layers} x {tag.n_kv_heads} x {tag.head_dim} ({tag.kv_dtype})")
        if self.reuse is not CacheReuse.DIMS:
            raise CacheFileError(f"written by other weights ({theirs.model_id} "
                                 f"{theirs.fingerprint}); set SEMANTIC_CACHE_REUSE=dims to reuse")

    def _quarantine(self, path: Path, reason: str) -> None:
        """Move a rejected file aside with its reason; keep only the newest few. Its shared
        copy, if any, is deleted: it is the same bytes."""
        self._cold.pop(path, None)
        self._tokens.pop(path, None)
        self._let_go(self._records.pop(path, ()))
        if self.shared is not None:
            self.shared.delete(path)
        target = self.cache_dir / QUARANTINE
        name = f"{path.parent.name}-{path.stem}-{int(time.time() * 1000)}"
        try:
            private_folder(target)
            shutil.move(str(path), target / f"{name}.safetensors")
            write_atomically(target / f"{name}.reason.txt",
                             lambda tmp: tmp.write_text(reason + "\n"))
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
    def hot_agents(self) -> list[HotCache]:
        """Resident caches, least recently used first (engine thread)."""
        return [HotCache(entry.agent_id, self._tag(entry), len(entry.tokens),
                         self._exact_bytes(entry))
                for entry in (self._hot[key] for key in self.pool.agents())]

    def cold_agents(self) -> list[dict[str, Any]]:
        """Every cold cache on disk, from the files' headers (a file that cannot be read is
        left for the next request of its agent to reject)."""
        summaries = []
        for path in self.cold_files():
            try:  # how many chunks it lists (its bytes are its own file's)
                summary = read_summary(path)
                summaries.append({**summary, "chunks": len(summary["chunks"])})
            except Exception as exc:  # any damage: reported, not fatal
                log.warning("unreadable cache file %s: %s", path.name, exc)
        return summaries

    def residency(self) -> Residency:
        """Hot and cold counts and bytes; safe to call from another thread (copies first)."""
        hot = list(self._hot.values())
        pending = dict(self._pending)  # written behind: cold, not yet on disk
        cold = [size for path, (size, _) in dict(self._cold).items() if path not in pending]
        cold += [write.nbytes for write in pending.values()]
        return Residency(len(hot), sum(self._exact_bytes(entry) for entry in hot),
                         len(cold), sum(cold) + sum(dict(self._chunks).values()))

    def _exact_bytes(self, entry: AgentCache) -> int:
        """What a hot cache really holds (no rounding to blocks)."""
        models = dict(self._models)
        digest = entry.tag.base.digest if entry.tag else None
        dims = models[digest][1] if digest in models else None
        if dims is None:
            return 0
        return sum(dims.cache_bytes(len(tokens)) for tokens in (
            entry.tokens, entry.checkpoint[1] if entry.checkpoint else []) if tokens)
