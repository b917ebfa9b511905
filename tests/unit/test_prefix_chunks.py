"""Content-addressed prefix chunks on disk, without a model: real mlx-lm cache objects whose
KV is a function of the tokens (as a model's is), so agents sharing a prefix share its KV.

A prefix several agents hold is written once; every file reads back exactly; the disk
budget counts a chunk once and frees it with the last file that lists it; a new agent
starts from chunks on disk; tenants never share chunks; a damaged chunk is never used.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache
from safetensors import safe_open

from semantic_server.cache.agent_store import AgentCacheStore, Lookup
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import AgentCache, CacheTag, agent_file_name
from semantic_server.cache.cache_writer import CacheWriter
from semantic_server.cache.prefix_chunks import CHUNKS, chunk_keys
from semantic_server.cache.restore_policy import RestoreOrRecompute
from semantic_server.config import DiskFormat
from semantic_server.models.dims import LayerCache, LayerKind, ModelDims

CHUNK = 16
FULL = ModelDims(2, 1, 8, "float32", (LayerCache(LayerKind.GLOBAL),) * 2)
FULL_TAG = CacheTag("tiny-full", "f00d", 2, 1, 8, 4, "float32", (None, None))
MIXED = ModelDims(2, 1, 8, "float32", (LayerCache(LayerKind.GLOBAL),
                                       LayerCache(LayerKind.SLIDING, 16)))
MIXED_TAG = CacheTag("tiny-mixed", "f00d", 2, 1, 8, 4, "float32", (None, 16))
PREFIX = list(range(1000, 1100))  # 100 tokens: 6 whole chunks of 16


def _kv(tokens: list[int]) -> mx.array:
    """Each position's KV from its token and position, like a model's (up to the prefix)."""
    values = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
    return values * mx.ones((1, 1, len(tokens), 8)) + mx.arange(8, dtype=mx.float32) / 8


def _cache(agent: str, tokens: list[int], tag: CacheTag = FULL_TAG) -> AgentCache:
    layers = []
    for window in tag.layer_windows:
        layer = KVCache() if window is None else RotatingKVCache(max_size=window)
        layer.update_and_fetch(_kv(tokens), _kv(tokens) + 1)
        layers.append(layer)
    return AgentCache(agent, layers, list(tokens), tag)


def _store(tmp_path, tag: CacheTag = FULL_TAG, dims: ModelDims = FULL,
           **kwargs) -> AgentCacheStore:
    store = AgentCacheStore(BlockPool(2**24, 4), tmp_path, chunk_tokens=CHUNK, **kwargs)
    store.add_model(tag, dims)
    return store


def _chunk_files(tmp_path, tag: CacheTag = FULL_TAG) -> set[str]:
    return {path.stem for path in (tmp_path / tag.digest / CHUNKS).glob("*.safetensors")}


def _bytes_on_disk(tmp_path) -> int:
    return sum(path.stat().st_size for path in tmp_path.rglob("*.safetensors")
               if "quarantine" not in path.parts)


def _assert_holds(entry: AgentCache | None, tokens: list[int]) -> None:
    """``entry`` holds exactly the KV of ``tokens`` in every full-attention layer."""
    assert entry is not None and entry.tokens == tokens
    for layer in entry.layers:
        if isinstance(layer, KVCache):
            assert layer.offset == len(tokens)
            keys, values = (np.array(a[..., :len(tokens), :]) for a in (layer.keys,
                                                                         layer.values))
            np.testing.assert_array_equal(keys, np.array(_kv(tokens)))
            np.testing.assert_array_equal(values, np.array(_kv(tokens) + 1))


def _two_agents(store: AgentCacheStore) -> dict[str, list[int]]:
    prompts = {"t1/a": PREFIX + list(range(30)), "t1/b": PREFIX + list(range(50, 80))}
    for agent, tokens in prompts.items():
        store.checkin(_cache(agent, tokens))
    store.evict_all(FULL_TAG)
    return prompts


def test_a_prefix_two_agents_share_is_written_once_and_both_read_back_exactly(tmp_path):
    store = _store(tmp_path)
    prompts = _two_agents(store)
    # 130 tokens each: 8 whole chunks (one token always stays in the agent's file); the
    # first 6 are the shared prefix's, so 6 + 2 + 2 chunk files
    assert len(_chunk_files(tmp_path)) == 10
    assert store.residency().cold_bytes == _bytes_on_disk(tmp_path)
    for agent, tokens in prompts.items():
        _assert_holds(store.checkout(FULL_TAG, agent), tokens)
    assert store.lookups[Lookup.DISK] == 2


def test_a_chunks_name_hashes_every_token_before_its_end_the_tag_format_and_tenant():
    keys = chunk_keys(FULL_TAG.digest, "native", "t1", PREFIX, CHUNK)
    assert len(keys) == 6 and len(set(keys)) == 6
    changed = [PREFIX[0] + 1, *PREFIX[1:]]  # the first token differs: every chunk does
    assert not set(keys) & set(chunk_keys(FULL_TAG.digest, "native", "t1", changed, CHUNK))
    late = [*PREFIX[:40], 0, *PREFIX[41:]]  # token 40 differs: chunks 0 and 1 are equal
    assert chunk_keys(FULL_TAG.digest, "native", "t1", late, CHUNK)[:2] == keys[:2]
    assert chunk_keys(FULL_TAG.digest, "native", "t1", late, CHUNK)[2] != keys[2]
    for other in (chunk_keys(MIXED_TAG.digest, "native", "t1", PREFIX, CHUNK),
                  chunk_keys(FULL_TAG.digest, "native", "t1", PREFIX, CHUNK // 2)[1::2],
                  chunk_keys(FULL_TAG.digest, "q4", "t1", PREFIX, CHUNK),
                  chunk_keys(FULL_TAG.digest, "native", "t2", PREFIX, CHUNK),
                  chunk_keys(FULL_TAG.digest, "native", None, PREFIX, CHUNK)):
        assert not set(other) & set(keys)


def test_a_new_agent_starts_from_chunks_on_disk_but_never_another_tenants(tmp_path):
    store = _store(tmp_path)
    _two_agents(store)
    prompt = PREFIX + [7] * 20
    entry = store.checkout(FULL_TAG, "t1/new", prompt)
    _assert_holds(entry, PREFIX[:96])  # the 6 whole chunks of the shared prefix
    assert store.lookups[Lookup.SHARED_PREFIX] == 1
    assert store.checkout(FULL_TAG, "t2/new", prompt) is None  # same prompt, other tenant
    assert store.lookups[Lookup.MISS] == 1
    anonymous = store.shared_prefix(FULL_TAG, prompt, "t1")  # an anonymous request's seed
    _assert_holds(anonymous, PREFIX[:96])


def test_the_disk_budget_counts_a_chunk_once_and_frees_it_with_its_last_file(tmp_path):
    probe = _store(tmp_path / "probe")
    _two_agents(probe)
    both = probe.residency().cold_bytes
    store = _store(tmp_path / "real", disk_budget_bytes=both + both // 4)
    prompts = _two_agents(store)
    store.checkin(_cache("t1/c", list(range(3000, 3130))))  # shares nothing: a's must go
    store.evict_all(FULL_TAG)
    assert store.disk_deletions >= 1
    folder = tmp_path / "real"
    assert _bytes_on_disk(folder) <= both + both // 4
    assert store.residency().cold_bytes == _bytes_on_disk(folder)
    shared = set(chunk_keys(FULL_TAG.digest, "native", "t1", PREFIX, CHUNK))
    if (folder / FULL_TAG.digest / agent_file_name("t1/b")).exists():
        assert shared <= _chunk_files(folder)  # b still lists them
        _assert_holds(store.checkout(FULL_TAG, "t1/b"), prompts["t1/b"])
    else:  # both went: nothing of the prefix is left
        assert not shared & _chunk_files(folder)
    _assert_holds(store.checkout(FULL_TAG, "t1/c"), list(range(3000, 3130)))


def test_a_restart_indexes_files_and_chunks_and_deletes_chunks_no_file_lists(tmp_path):
    store = _store(tmp_path)
    prompts = _two_agents(store)
    (tmp_path / FULL_TAG.digest / agent_file_name("t1/a")).unlink()  # as if never written
    again = _store(tmp_path)
    assert len(_chunk_files(tmp_path)) == 8  # a's own 2 are gone, the shared 6 stay for b
    assert again.residency().cold_bytes == _bytes_on_disk(tmp_path)
    _assert_holds(again.checkout(FULL_TAG, "t1/b"), prompts["t1/b"])


def _flip_a_value(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one KV value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_flip_a_value, lambda path: path.unlink()],
                         ids=["flipped", "missing"])
def test_a_damaged_chunk_is_never_used_and_the_next_write_makes_it_again(tmp_path, damage):
    store = _store(tmp_path)
    prompts = _two_agents(store)
    first = chunk_keys(FULL_TAG.digest, "native", "t1", PREFIX, CHUNK)[0]
    path = tmp_path / FULL_TAG.digest / CHUNKS / f"{first}.safetensors"
    damage(path)
    assert store.checkout(FULL_TAG, "t1/a") is None
    assert store.lookups[Lookup.REJECTED] == 1 and not path.exists()
    assert store.checkout(FULL_TAG, "t1/b") is None  # it listed the chunk too
    assert store.lookups[Lookup.REJECTED] == 2
    store.checkin(_cache("t1/b", prompts["t1/b"]))
    store.evict_all(FULL_TAG)
    assert path.exists()
    _assert_holds(store.checkout(FULL_TAG, "t1/b"), prompts["t1/b"])


def test_a_chunk_that_cannot_be_read_now_is_a_miss_and_its_files_stay(tmp_path):
    # A real I/O error on the chunk (a directory where its file was; permissions would not
    # stop root): the agent's file is not quarantined, and serves once the chunk is back.
    store = _store(tmp_path)
    prompts = _two_agents(store)
    first = chunk_keys(FULL_TAG.digest, "native", "t1", PREFIX, CHUNK)[0]
    path = tmp_path / FULL_TAG.digest / CHUNKS / f"{first}.safetensors"
    aside = path.rename(path.with_suffix(".aside"))
    path.mkdir()
    assert store.checkout(FULL_TAG, "t1/a") is None
    assert store.read_failures == 1 and store.lookups[Lookup.REJECTED] == 0
    assert (tmp_path / FULL_TAG.digest / agent_file_name("t1/a")).exists()
    path.rmdir()
    aside.rename(path)
    _assert_holds(store.checkout(FULL_TAG, "t1/a"), prompts["t1/a"])


def test_sliding_window_layers_stay_whole_and_seed_no_one_from_disk(tmp_path):
    store = _store(tmp_path, MIXED_TAG, MIXED)
    tokens = PREFIX + list(range(30))
    store.checkin(_cache("t1/a", tokens, MIXED_TAG))
    store.evict_all(MIXED_TAG)
    assert len(_chunk_files(tmp_path, MIXED_TAG)) == 8  # the global layer's
    entry = store.checkout(MIXED_TAG, "t1/a")
    _assert_holds(entry, tokens)
    window = entry.layers[1]
    assert isinstance(window, RotatingKVCache) and window.offset == len(tokens)
    original = _cache("t1/a", tokens, MIXED_TAG).layers[1]
    np.testing.assert_array_equal(np.array(window.state[0]), np.array(original.state[0]))
    assert store.checkout(MIXED_TAG, "t1/new", [*tokens, 1]) is None


@pytest.mark.parametrize("fmt", [DiskFormat.Q4, DiskFormat.FLOAT16])
def test_chunks_are_written_in_the_stores_format(tmp_path, fmt):
    store = _store(tmp_path, disk_format=fmt)
    prompts = _two_agents(store)
    native = _store(tmp_path / "native")
    _two_agents(native)
    assert store.residency().cold_bytes < native.residency().cold_bytes
    for chunk in (tmp_path / FULL_TAG.digest / CHUNKS).glob("*.safetensors"):
        with safe_open(str(chunk), framework="numpy") as handle:
            assert handle.metadata()["disk_format"] == fmt.value
    entry = store.checkout(FULL_TAG, "t1/a")
    assert entry is not None and entry.tokens == prompts["t1/a"]
    np.testing.assert_allclose(np.array(entry.layers[0].keys[..., :130, :]),
                               np.array(_kv(prompts["t1/a"])), rtol=0.1, atol=0.5)


def test_spills_written_behind_share_their_chunks(tmp_path):
    writer = CacheWriter()
    try:
        store = AgentCacheStore(BlockPool(FULL.bytes_per_token * 140, 4), tmp_path,
                                writer=writer, chunk_tokens=CHUNK)
        store.add_model(FULL_TAG, FULL)
        prompts = {"t1/a": PREFIX + list(range(30)), "t1/b": PREFIX + list(range(50, 80))}
        for agent, tokens in prompts.items():  # b's check-in spills a (the budget holds one)
            store.checkin(_cache(agent, tokens))
        store.flush()
        assert len(_chunk_files(tmp_path)) == 8  # a's file: 8 chunks
        store.evict_all(FULL_TAG)
        assert len(_chunk_files(tmp_path)) == 10
        assert store.residency().cold_bytes == _bytes_on_disk(tmp_path)
        for agent, tokens in prompts.items():
            _assert_holds(store.checkout(FULL_TAG, agent), tokens)
    finally:
        writer.close()


def test_a_cache_on_disk_is_prefilled_when_that_is_measured_to_be_faster(tmp_path):
    store = _store(tmp_path)
    prompts = _two_agents(store)
    model = FULL_TAG.base.digest
    assert store.policy.restore_pays(model, 10**9, 1)  # nothing measured: read it
    _assert_holds(store.checkout(FULL_TAG, "t1/a"), prompts["t1/a"])
    store.policy.read_seconds_per_byte = 1.0  # a disk that takes a second a byte
    store.policy.prefilled(model, 100, 0.1)  # and a model that prefills 1,000 tokens/s
    assert store.checkout(FULL_TAG, "t1/b") is None
    assert store.lookups[Lookup.RECOMPUTE] == 1
    assert (tmp_path / FULL_TAG.digest / agent_file_name("t1/b")).exists()  # kept
    store.policy.read_seconds_per_byte = 1e-12  # a fast disk: read again
    _assert_holds(store.checkout(FULL_TAG, "t1/b"), prompts["t1/b"])


def test_the_policy_averages_what_it_measures_and_ignores_short_prefills():
    policy = RestoreOrRecompute()
    policy.prefilled("m", 8, 100.0)  # a fixed cost more than a rate: ignored
    assert "m" not in policy.prefill_seconds_per_token
    policy.prefilled("m", 100, 1.0)
    policy.prefilled("m", 100, 2.0)
    assert policy.prefill_seconds_per_token["m"] == pytest.approx(0.012)
    policy.read(1000, 1.0)  # a small read: mostly fixed cost, ignored
    assert policy.read_seconds_per_byte is None
    policy.read(10**7, 10.0)  # a microsecond a byte
    assert policy.restore_pays("m", 1000, 10)  # 1 ms to read, 0.12 s to prefill
    assert not policy.restore_pays("m", 10**6, 10)  # 1 s to read, 0.12 s to prefill
    assert policy.restore_pays("m", 10**6, 100)  # 1 s to read, 1.2 s to prefill
    # Faster to prefill, but not by the margin a noisy measurement needs: read.
    assert policy.restore_pays("m", 10**6, 50)  # 1 s to read, 0.6 s to prefill
    assert not policy.restore_pays("m", 10**6, 40)  # 1 s to read, 0.48 s to prefill
    assert policy.restore_pays("other", 1000, 10)  # its model's rate is unknown
