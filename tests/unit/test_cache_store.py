"""BlockPool, cache files and the AgentCacheStore, without a model: real mlx-lm cache
objects holding small arrays."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import threading
import zlib

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from semantic_server.cache.agent_store import AgentCacheStore, Lookup
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import (
    AgentCache,
    CacheFileError,
    CacheTag,
    agent_file_name,
    prepare_file,
    read_cache,
    read_tag_file,
    write_cache,
    write_prepared,
)
from semantic_server.cache.cache_writer import CacheWriter
from semantic_server.config import CacheReuse, DiskFormat
from semantic_server.errors import CacheWriteError
from semantic_server.models.dims import LayerCache, LayerKind, ModelDims
from tests.polling import wait_for

DIMS = ModelDims(2, 1, 8, "float32", (LayerCache(LayerKind.GLOBAL),
                                       LayerCache(LayerKind.SLIDING, 16)))
TAG = CacheTag("tiny", "f00d", 2, 1, 8, 4, "float32", (None, 16))


def _layers(tokens: int, window: int = 16) -> list:
    """A global and a sliding layer that have seen ``tokens`` tokens."""
    glob, slide = KVCache(), RotatingKVCache(max_size=window)
    for start in range(0, tokens, 5):
        n = min(5, tokens - start)
        k = mx.arange(start, start + n, dtype=mx.float32).reshape(1, 1, n, 1) * mx.ones(
            (1, 1, n, 8))
        glob.update_and_fetch(k, k + 1)
        slide.update_and_fetch(k, k + 1)
    return [glob, slide]


def _hot(store: AgentCacheStore) -> list[str]:
    return [cache.agent_id for cache in store.hot_agents()]


def test_block_pool_counts_whole_blocks_and_picks_lru_victims():
    block = DIMS.bytes_per_token * 4
    pool = BlockPool(budget_bytes=block * 10, block_tokens=4)
    # 40 tokens: the global layer holds 40, the sliding one 16 -> 56 layer-tokens of 64 bytes
    assert pool.bytes_for(DIMS, 40) == 7 * block
    for agent in ("a", "b", "c"):
        pool.allocate(agent, pool.bytes_for(DIMS, 8))
    assert pool.used == 6 * block and pool.free == 4 * block
    assert pool.victims_for(pool.bytes_for(DIMS, 20)) == ["a"]
    assert pool.victims_for(pool.bytes_for(DIMS, 10_000)) is None
    with pytest.raises(RuntimeError):
        pool.allocate("d", 5 * block)


def test_two_models_share_one_budget_and_never_each_others_caches(tmp_path):
    # A model of twice the geometry beside TAG's: each cache counts in its own blocks.
    wide = ModelDims(2, 2, 8, "float32", DIMS.layers)
    wide_tag = CacheTag("wide", "d00d", 2, 2, 8, 4, "float32", (None, 16))
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    store = AgentCacheStore(pool, tmp_path)
    store.add_model(TAG, DIMS)
    store.add_model(wide_tag, wide)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    assert pool.used == pool.bytes_for(DIMS, 8)
    assert store.checkout(wide_tag, "a") is None  # a's cache is TAG's model's only
    assert store.checkout(TAG, "a") is not None
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    with pytest.raises(RuntimeError, match="hot caches"):
        store.remove_model(TAG)
    assert store.evict_all(wide_tag) == [] and _hot(store) == ["a"]
    assert store.evict_all(TAG) == ["a"] and pool.used == 0
    store.remove_model(TAG)
    assert (tmp_path / TAG.digest / agent_file_name("a")).exists()


def test_cache_file_round_trip_trims_and_keeps_offsets(tmp_path):
    layers = _layers(23)
    path = tmp_path / "t" / agent_file_name("agent-1")
    size = write_cache(path, TAG, AgentCache("agent-1", layers, list(range(23))))
    assert size == path.stat().st_size
    assert not list(path.parent.glob(".*tmp*"))
    loaded = read_cache(path)
    assert loaded.tag == TAG and loaded.agent_id == "agent-1" and loaded.tokens == list(range(23))
    glob, slide = loaded.layers
    assert glob.offset == 23 and glob.keys.shape[2] == 23  # trimmed from the 256-step buffer
    assert slide.offset == 23 and slide.max_size == 16
    assert mx.array_equal(glob.state[0], layers[0].state[0][..., :23, :]).item()
    assert mx.array_equal(slide.keys, layers[1].keys).item()


def test_damaged_file_is_a_cache_file_error(tmp_path):
    path = tmp_path / agent_file_name("agent-1")
    write_cache(path, TAG, AgentCache("agent-1", _layers(5), list(range(5))))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFileError):
        read_cache(path)


def test_store_evicts_lru_to_disk_and_restores(tmp_path):
    pool = BlockPool(budget_bytes=DIMS.bytes_per_token * 4 * 5, block_tokens=4)
    store = AgentCacheStore(pool, tmp_path)
    store.add_model(TAG, DIMS)
    for agent in ("a", "b", "c"):
        store.checkin(AgentCache(agent, _layers(8), list(range(8)), TAG))
    assert _hot(store) == ["b", "c"]  # "a" went to disk to make room
    assert (tmp_path / TAG.digest / agent_file_name("a")).exists()
    back = store.checkout(TAG, "a")
    assert back is not None and back.tokens == list(range(8)) and store.lookups[Lookup.DISK] == 1
    assert store.checkout(TAG, "nobody") is None and store.lookups[Lookup.MISS] == 1
    assert store.checkout(TAG, "c") is not None and store.lookups[Lookup.HOT] == 1


def test_store_rejects_other_dims_and_quarantines(tmp_path):
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    store = AgentCacheStore(pool, tmp_path)
    store.add_model(TAG, DIMS)
    other = CacheTag("other", "beef", 2, 1, 8, 4, "float32", (None, 32))
    write_cache(tmp_path / TAG.digest / agent_file_name("a"), other,
                AgentCache("a", _layers(4, window=32), list(range(4))))
    assert store.checkout(TAG, "a") is None
    assert store.lookups[Lookup.REJECTED] == 1
    reasons = list((tmp_path / "quarantine").glob("*.reason.txt"))
    assert len(reasons) == 1 and "dims differ" in reasons[0].read_text()


def test_disk_budget_deletes_the_oldest_cold_caches(tmp_path):
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    one_file = write_cache(tmp_path / "probe" / "x.safetensors", TAG,
                           AgentCache("x", _layers(8), list(range(8))))
    store = AgentCacheStore(pool, tmp_path / "caches", disk_budget_bytes=int(one_file * 2.5))
    store.add_model(TAG, DIMS)
    for agent in ("a", "b", "c", "d"):
        store.checkin(AgentCache(agent, _layers(8), list(range(8)), TAG))
        store.evict_all()
    names = {p.name for p in store.cold_files()}
    assert names == {agent_file_name("c"), agent_file_name("d")}


def test_evict_all_keeps_every_cache_hot_when_a_write_fails(tmp_path):
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    store = AgentCacheStore(pool, tmp_path / "caches")
    store.add_model(TAG, DIMS)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.checkin(AgentCache("b", _layers(8), list(range(8)), TAG))
    # The tag's folder is a plain file, so every write fails (a real OSError).
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / TAG.digest).write_text("in the way")
    with pytest.raises(CacheWriteError, match="2 of 2 agent caches"):
        store.evict_all()
    assert sorted(_hot(store)) == ["a", "b"]
    assert sorted(pool.agents()) == [(TAG.digest, "a"), (TAG.digest, "b")]
    assert store.write_failures == 2
    (tmp_path / "caches" / TAG.digest).unlink()
    assert sorted(store.evict_all()) == ["a", "b"] and store.hot_agents() == []
    assert len(store.cold_files()) == 2


def _rewrite_metadata(path, **changes):
    arrays, metadata = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, {**metadata, **changes})


@pytest.mark.parametrize("layout", [["@array"], []])
def test_file_whose_state_does_not_fit_its_class_is_rejected_not_raised(tmp_path, layout):
    # Readable safetensors with a well-formed tag, but layer 0's state has lost its values
    # (or everything): the rebuild fails, and that must be a rejection like any damage.
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path)
    store.add_model(TAG, DIMS)
    path = tmp_path / TAG.digest / agent_file_name("a")
    write_cache(path, TAG, AgentCache("a", _layers(6), list(range(6))))
    layouts = json.loads(mx.load(str(path), return_metadata=True)[1]["layouts"])
    _rewrite_metadata(path, layouts=json.dumps([layout, layouts[1]]))
    with pytest.raises(CacheFileError):
        read_cache(path)
    assert store.checkout(TAG, "a") is None and store.lookups[Lookup.REJECTED] == 1
    assert not path.exists() and len(list((tmp_path / "quarantine").glob("*.reason.txt"))) == 1


def test_a_bad_tag_file_is_skipped_by_dims_reuse(tmp_path):
    # Another model of the same dims left a cache and a tag file that is not JSON (a disk
    # that filled while it was written, before tag files were written atomically).
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path,
                            reuse="dims")
    store.add_model(TAG, DIMS)
    twin = CacheTag("twin", "cafe", *TAG.shape_key()[:3], 4, "float32", (None, 16))
    for agent in ("a", "b"):
        write_cache(tmp_path / twin.digest / agent_file_name(agent), twin,
                    AgentCache(agent, _layers(6), list(range(6))))
    assert store.checkout(TAG, "a") is not None  # the twin's cache serves: same dims
    (tmp_path / twin.digest / "tag.json").write_text("")
    assert store.checkout(TAG, "b") is None and store.lookups[Lookup.MISS] == 1
    assert (tmp_path / twin.digest / agent_file_name("b")).exists()  # skipped, not rejected
    # The next write into that folder repairs its tag file.
    write_cache(tmp_path / twin.digest / agent_file_name("c"), twin,
                AgentCache("c", _layers(2), [0, 1]))
    assert read_tag_file(tmp_path / twin.digest) == twin


def _store(tmp_path, **kwargs) -> AgentCacheStore:
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4),
                            tmp_path, **kwargs)
    store.add_model(TAG, DIMS)
    return store


def _damage_truncate(data: bytes) -> bytes:
    return data[: len(data) - 40]


def _damage_zero(data: bytes) -> bytes:
    return bytes(len(data))


def _damage_flip_a_value(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-9] ^= 0x40  # inside the last array's bytes: only the checksum can tell
    return bytes(flipped)


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_zero, _damage_flip_a_value])
def test_a_damaged_file_never_reaches_the_batch(tmp_path, damage):
    store = _store(tmp_path)
    path = tmp_path / TAG.digest / agent_file_name("a")
    write_cache(path, TAG, AgentCache("a", _layers(12), list(range(12))))
    path.write_bytes(damage(path.read_bytes()))
    assert store.checkout(TAG, "a") is None and store.lookups[Lookup.REJECTED] == 1
    reason = next((tmp_path / "quarantine").glob("*.reason.txt")).read_text()
    print(damage.__name__, "->", reason.strip())
    assert not path.exists()


def test_counts_that_disagree_with_the_arrays_are_rejected(tmp_path):
    path = tmp_path / agent_file_name("a")
    write_cache(path, TAG, AgentCache("a", _layers(6), list(range(6))))
    arrays, metadata = mx.load(str(path), return_metadata=True)
    arrays["tokens"] = mx.array(list(range(7)), dtype=mx.int32)  # one token too many
    checksums = json.loads(metadata["checksums"])
    checksums["tokens"] = zlib.crc32(memoryview(np.asarray(arrays["tokens"])))
    mx.save_safetensors(str(path), arrays, {**metadata, "token_count": "7",
                                            "checksums": json.dumps(checksums)})
    with pytest.raises(CacheFileError, match="holds 6 tokens"):
        read_cache(path)


def test_a_file_that_cannot_be_opened_now_is_a_miss_not_a_quarantine(tmp_path):
    # A real EMFILE: the process may open no more files while the store looks.
    store = _store(tmp_path)
    path = tmp_path / TAG.digest / agent_file_name("a")
    write_cache(path, TAG, AgentCache("a", _layers(6), list(range(6))))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # a new file gets the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # so none may open
    try:
        assert store.checkout(TAG, "a") is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert store.lookups[Lookup.MISS] == 1 and store.read_failures == 1
    assert path.exists() and not (tmp_path / "quarantine").exists()
    back = store.checkout(TAG, "a")  # once files can be opened again, it serves
    assert back is not None and back.tokens == list(range(6))


def test_evict_all_makes_room_but_never_deletes_what_it_writes(tmp_path):
    one = write_cache(tmp_path / "probe" / "x.safetensors", TAG,
                      AgentCache("x", _layers(8), list(range(8))))
    (tmp_path / "probe" / "x.safetensors").unlink()
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4),
                            tmp_path / "caches", disk_budget_bytes=int(one * 2.5))
    store.add_model(TAG, DIMS)
    store.checkin(AgentCache("old", _layers(8), list(range(8)), TAG))
    store.evict_all()
    for agent in ("a", "b"):  # a swap's evict writes two caches: the old one must go
        store.checkin(AgentCache(agent, _layers(8), list(range(8)), TAG))
    assert sorted(store.evict_all()) == ["a", "b"]
    assert {p.name for p in store.cold_files()} == {agent_file_name("a"), agent_file_name("b")}
    assert store.disk_deletions == 1
    for agent in ("c", "d", "e"):  # three do not fit at all: refused, nothing deleted
        store.checkin(AgentCache(agent, _layers(8), list(range(8)), TAG))
    with pytest.raises(CacheWriteError, match="disk budget"):
        store.evict_all()
    assert sorted(_hot(store)) == ["c", "d", "e"] and store.disk_deletions == 1
    assert len(store.cold_files()) == 2


def test_the_index_matches_the_folder_after_a_restart(tmp_path):
    store = _store(tmp_path)
    for agent in ("a", "b"):
        store.checkin(AgentCache(agent, _layers(5), list(range(5)), TAG))
    store.evict_all()
    again = _store(tmp_path)
    assert sorted(again.cold_files()) == sorted(store.cold_files())
    assert again.residency().cold_bytes == sum(p.stat().st_size for p in store.cold_files())


def test_quarantine_keeps_only_the_newest_files(tmp_path, monkeypatch):
    monkeypatch.setattr("semantic_server.cache.agent_store.QUARANTINE_KEPT", 2)
    store = _store(tmp_path)
    for agent in ("a", "b", "c"):
        path = tmp_path / TAG.digest / agent_file_name(agent)
        write_cache(path, TAG, AgentCache(agent, _layers(4), list(range(4))))
        path.write_bytes(b"\0" * 64)
        assert store.checkout(TAG, agent) is None
    assert len(list((tmp_path / "quarantine").glob("*.safetensors"))) == 2
    assert len(list((tmp_path / "quarantine").glob("*.reason.txt"))) == 2


def test_caches_are_kept_per_adapter_and_never_cross(tmp_path):
    """An adapter on the attention projections changes the keys and values: an agent's
    cache made under one adapter is never used under another (a counted miss), and each
    comes back, hot or from disk, when its own adapter does."""
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path)
    store.add_model(TAG, DIMS)
    caps, sig = TAG.with_adapter("caps@1111"), TAG.with_adapter("sig@2222")
    assert len({TAG.digest, caps.digest, sig.digest}) == 3 and caps.base == TAG
    assert "adapter" not in json.loads(TAG.to_json())  # the base keeps its old digest
    store.checkin(AgentCache("a", _layers(12), list(range(12)), caps))
    assert store.checkout(sig, "a") is None  # caps's cache is not sig's
    assert store.checkout(TAG, "a") is None  # nor the base model's
    assert store.lookups[Lookup.OTHER_ADAPTER] == 2 and store.lookups[Lookup.MISS] == 0
    back = store.checkout(caps, "a")
    assert back is not None and back.tokens == list(range(12)) and back.tag == caps
    store.checkin(back)
    store.checkin(AgentCache("a", _layers(5), list(range(5)), sig))  # one cache per adapter
    assert store.evict_all(TAG) == ["a", "a"]  # the model's caches, whatever the adapter
    assert store.checkout(TAG, "a") is None and store.lookups[Lookup.OTHER_ADAPTER] == 3
    from_disk = store.checkout(caps, "a")
    assert from_disk is not None and len(from_disk.tokens) == 12 and from_disk.tag == caps
    other = store.checkout(sig, "a")
    assert other is not None and len(other.tokens) == 5
    store.remove_model(TAG)


def test_dims_reuse_never_crosses_adapters(tmp_path):
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path,
                            reuse=CacheReuse.DIMS)
    caps = TAG.with_adapter("caps@1111")
    reimported = CacheTag("tiny", "beef", 2, 1, 8, 4, "float32", (None, 16))
    store.add_model(TAG, DIMS)
    store.add_model(reimported, DIMS)
    store.checkin(AgentCache("a", _layers(12), list(range(12)), caps))
    store.evict_all()
    assert store.checkout(reimported, "a") is None  # same dims, but made under an adapter
    assert store.checkout(reimported.with_adapter("caps@1111"), "a") is not None


@pytest.mark.parametrize(("fmt", "size_ratio", "tolerance"), [
    (DiskFormat.NATIVE, 1.0, 0.0), (DiskFormat.FLOAT16, 0.5, 1e-3),
    (DiskFormat.Q8, 0.31, 2e-2), (DiskFormat.Q4, 0.19, 2e-1)])
def test_every_disk_format_round_trips_within_its_precision(tmp_path, fmt, size_ratio,
                                                            tolerance):
    """KV of random values (head dim 32: one quantization group per row), written in each
    format and read back by the same reader: native exactly, the others within their
    precision, in the compute dtype, the file smaller in proportion."""
    mx.random.seed(0)
    keys = mx.random.normal((1, 2, 2000, 32))
    layer = KVCache()
    layer.update_and_fetch(keys, keys * 0.5)
    tag = CacheTag("tiny", "f00d", 1, 2, 32, 4, "float32", (None,))
    native = write_cache(tmp_path / "n" / "a.safetensors", tag,
                         AgentCache("a", [layer], list(range(2000))))
    path = tmp_path / fmt.value / "a.safetensors"
    size = write_cache(path, tag, AgentCache("a", [layer], list(range(2000))), fmt)
    assert size == pytest.approx(native * size_ratio, rel=0.05)
    read = read_cache(path).layers[0]
    assert read.keys.dtype == mx.float32 and read.offset == 2000
    error = float(mx.abs(read.keys - keys).max()) / float(mx.abs(keys).max())
    assert error <= tolerance
    assert (error == 0) == (fmt is DiskFormat.NATIVE)


def test_a_store_writes_its_format_and_reads_any(tmp_path):
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    writer = AgentCacheStore(pool, tmp_path, disk_format=DiskFormat.Q4)
    writer.add_model(TAG, DIMS)
    writer.checkin(AgentCache("a", _layers(12), list(range(12)), TAG))
    writer.evict_all()
    reader = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path)
    reader.add_model(TAG, DIMS)
    back = reader.checkout(TAG, "a")  # a native store reads it (head dim 8: float16)
    assert back is not None and back.tokens == list(range(12))
    assert float(mx.abs(back.layers[0].keys - _layers(12)[0].keys[..., :12, :]).max()) < 0.5


class GatedWrites:
    """The writer's write function, held until released and failing on request: a fault
    (a write that fails, then one that passes) a test cannot cause on a real disk at will."""

    def __init__(self, failures: int = 0) -> None:
        self.gate = threading.Event()
        self.failures = failures
        self.attempts = 0

    def __call__(self, path, prepared) -> int:
        assert self.gate.wait(30), "the test never released the writer"
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError("injected write failure")
        return write_prepared(path, prepared)


def _store_behind(tmp_path, writes: GatedWrites, budget_tokens: int = 8,
                  behind_tokens: int | None = None):
    pool = BlockPool(budget_bytes=BlockPool(1, 4).bytes_for(DIMS, budget_tokens), block_tokens=4)
    bound = None if behind_tokens is None else pool.bytes_for(DIMS, behind_tokens)
    store = AgentCacheStore(pool, tmp_path, writer=CacheWriter(writes),
                            write_behind_bytes=bound)
    store.add_model(TAG, DIMS)
    return store


def test_a_spill_is_written_behind_and_its_agent_is_served_from_memory_meanwhile(tmp_path):
    writes = GatedWrites()
    store = _store_behind(tmp_path, writes)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.checkin(AgentCache("b", _layers(8), list(range(8)), TAG))  # a spills: queued
    assert _hot(store) == ["b"] and store.cold_files() == []  # nothing written yet
    assert store.residency().cold_agents == 1  # but it counts as cold
    back = store.checkout(TAG, "a")  # the writer is still held: served from memory
    assert back is not None and back.tokens == list(range(8))
    assert store.lookups[Lookup.DISK] == 1
    writes.gate.set()
    store.flush()
    assert store.cold_files() == [tmp_path / TAG.digest / agent_file_name("a")]
    assert read_cache(store.cold_files()[0]).tokens == list(range(8))
    store.close()


def test_a_write_that_fails_is_retried_once_then_counted_and_the_cache_stays_hot(tmp_path):
    writes = GatedWrites(failures=1)
    store = _store_behind(tmp_path, writes, budget_tokens=12)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.reserve("job", TAG, 8)  # a running request makes a spill
    writes.gate.set()
    store.flush()
    assert writes.attempts == 2 and store.write_failures == 0  # the retry passed
    assert len(store.cold_files()) == 1

    writes.failures, writes.attempts = 2, 0  # now both attempts fail
    store.unreserve("job")
    store.checkin(store.checkout(TAG, "a"))
    store.reserve("job", TAG, 8)
    store.unreserve("job")  # the room is back by the time the failure is known
    store.flush()
    assert writes.attempts == 2 and store.write_failures == 1
    assert _hot(store) == ["a"]  # kept in memory, not lost
    store.close()


def test_spills_waiting_for_the_writer_hold_their_bound_and_then_wait_for_the_disk(tmp_path):
    writes = GatedWrites()
    store = _store_behind(tmp_path, writes, behind_tokens=8)  # room for one spill behind
    one = store.pool.bytes_for(DIMS, 8)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.checkin(AgentCache("b", _layers(8), list(range(8)), TAG))  # a is queued
    assert store.writing_bytes == one and store.write_behind_waits == 0
    seen = []

    def disk() -> None:  # the writer's disk, released once b's spill waits for it
        wait_for(lambda: store.write_behind_waits == 1, timeout=10, what="the spill to wait")
        seen.append(store.writing_bytes)
        writes.gate.set()

    releaser = threading.Thread(target=disk)
    releaser.start()
    # b's spill would hold two behind: this (engine) thread waits for a's write.
    store.checkin(AgentCache("c", _layers(8), list(range(8)), TAG))
    releaser.join(timeout=30)
    assert seen == [one]  # while it waited, only a was behind
    assert store.writing_bytes <= one  # a written; b at most behind
    store.flush()
    assert store.writing_bytes == 0 and _hot(store) == ["c"]
    assert sorted(p.name for p in store.cold_files()) == sorted(
        agent_file_name(agent) for agent in ("a", "b"))
    store.close()


def test_a_spill_after_the_writer_closed_is_written_at_once_and_waits_for_nothing(tmp_path):
    writes = GatedWrites()
    writes.gate.set()
    store = _store_behind(tmp_path, writes, behind_tokens=0)
    store.close()  # shutting down: the engine may still evict before it stops
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.checkin(AgentCache("b", _layers(8), list(range(8)), TAG))  # a spills
    assert store.cold_files() == [tmp_path / TAG.digest / agent_file_name("a")]
    assert store.writing_bytes == 0 and store.write_behind_waits == 0


def test_evict_all_waits_for_writes_behind_and_stays_all_or_nothing(tmp_path):
    writes = GatedWrites()
    store = _store_behind(tmp_path, writes)
    store.checkin(AgentCache("a", _layers(8), list(range(8)), TAG))
    store.checkin(AgentCache("b", _layers(8), list(range(8)), TAG))  # a is queued
    threading.Timer(0.05, writes.gate.set).start()  # the writer is slow, not stuck
    assert store.evict_all() == ["b"]  # returns once a's write has landed too
    assert sorted(p.name for p in store.cold_files()) == sorted(
        agent_file_name(agent) for agent in ("a", "b"))
    store.close()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_files_written_from_prepared_buffers_read_back_exactly(tmp_path, dtype):
    layers = _layers(11)
    for layer in layers:  # strided views of preallocated buffers, as a batch leaves them
        layer.keys, layer.values = layer.keys.astype(dtype), layer.values.astype(dtype)
    tag = dataclasses.replace(TAG, kv_dtype=str(dtype).rpartition(".")[2])
    entry = AgentCache("a", layers, list(range(11)), tag)
    path = tmp_path / "a.safetensors"
    write_prepared(path, prepare_file(tag, entry))
    back = read_cache(path)
    for theirs, ours in zip(back.layers, layers, strict=True):
        for got, want in zip(theirs.state[:2], ours.state[:2], strict=True):
            used = want[..., : got.shape[2], :]  # the positions in use, not the padding
            assert got.dtype == want.dtype and mx.array_equal(got, used).item()


def test_a_new_agent_starts_from_the_prefix_another_agent_of_its_tenant_holds(tmp_path):
    pool = BlockPool(budget_bytes=2**20, block_tokens=4)
    store = AgentCacheStore(pool, tmp_path)
    store.add_model(TAG, DIMS)
    held = list(range(60))
    store.checkin(AgentCache("t1/old", _layers(60, window=64), held, TAG))
    prompt = [*held[:56], 999, 998]  # shares 56 tokens with old's cache
    seeded = store.checkout(TAG, "t1/new", prompt)
    assert seeded is not None and seeded.tokens == held[:56]
    assert [layer.offset for layer in seeded.layers] == [56, 56]
    assert store.lookups[Lookup.SHARED_PREFIX] == 1 and store.lookups[Lookup.MISS] == 0
    old = store.checkout(TAG, "t1/old")  # untouched by the copy and its trim
    assert [layer.offset for layer in old.layers] == [60, 60] and old.tokens == held
    store.checkin(old)
    assert store.checkout(TAG, "t2/new", prompt) is None  # never across tenants
    assert store.checkout(TAG.with_adapter("x@1"), "t1/other", prompt) is None  # nor adapters
    assert store.checkout(TAG, "t1/short", [*held[:40], 7]) is None  # under 48 shared
    assert store.lookups[Lookup.MISS] == 3


def test_a_wrapped_window_seeds_no_one(tmp_path):
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path)
    store.add_model(TAG, DIMS)
    store.checkin(AgentCache("old", _layers(60), list(range(60)), TAG))  # window 16 wrapped
    assert store.shared_prefix(TAG, [*list(range(56)), 5], None) is None
