"""The shared store against a real Redis (started on a free port, stopped by PID): leases
exclude, a value that fails its checksum is deleted and the agent prefills, a cache over
the size limit stays local, and a Redis that is down is counted, never fatal, and never
shows its password."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from semantic_server.cache.agent_store import AgentCacheStore, Lookup
from semantic_server.cache.block_pool import BlockPool
from semantic_server.cache.cache_file import AgentCache, agent_file_name, prepare_file
from semantic_server.cache.prefix_chunks import CHUNKS
from semantic_server.cache.shared_store import SharedStore
from tests.polling import wait_for
from tests.servers import RedisProcess, free_port
from tests.unit.test_cache_store import DIMS, TAG, _layers
from tests.unit.test_prefix_chunks import FULL, FULL_TAG, _cache


@pytest.fixture(scope="module")
def redis_server():
    server = RedisProcess().start()
    yield server
    server.stop()


def _store(tmp_path, shared: SharedStore) -> AgentCacheStore:
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), tmp_path,
                            shared=shared)
    store.add_model(TAG, DIMS)
    return store


def test_a_lease_is_one_turns_until_released_or_expired(redis_server):
    one, two = (SharedStore(redis_server.url, 2**20) for _ in range(2))
    first, second, third = one.turn_token(), two.turn_token(), one.turn_token()
    assert one.acquire("agent", first, 30) is True
    assert two.acquire("agent", second, 30) is False
    assert one.acquire("agent", third, 30) is False  # this server's next turn waits too
    two.release("agent", second)  # not its lease to free
    one.release("agent", third)
    assert two.acquire("agent", second, 30) is False
    one.release("agent", first)
    assert two.acquire("agent", second, 0.2) is True  # two dies without releasing it...
    client = redis_server.client()
    wait_for(lambda: client.get(SharedStore.lease_key("agent")) is None, timeout=10)
    assert one.acquire("agent", third, 30) is True  # ...and its lease expires
    two.renew("agent", second, 30)  # never another's: one's turn still holds it
    assert client.get(SharedStore.lease_key("agent")).decode() == third


def test_an_older_copy_never_replaces_a_newer_shared_one(tmp_path, redis_server):
    shared = SharedStore(redis_server.url, 2**20)
    path = tmp_path / TAG.digest / agent_file_name("late")
    for tokens in (12, 8):  # another server's newer turn, then this one's late spill
        shared.write_through(path, prepare_file(TAG, AgentCache(
            "late", _layers(tokens), list(range(tokens)), TAG)))
    assert shared.tokens(path) == 12
    assert len(redis_server.client().get(SharedStore.cache_key(path))) > path.stat().st_size


def test_a_shared_value_that_fails_its_checksum_is_deleted_and_the_agent_prefills(
        tmp_path, redis_server):
    shared = SharedStore(redis_server.url, 2**20)
    writer = _store(tmp_path / "one", shared)
    path = tmp_path / "one" / TAG.digest / agent_file_name("a")
    shared.write_through(path, prepare_file(TAG, AgentCache("a", _layers(8), list(range(8)),
                                                            TAG)))
    key = SharedStore.cache_key(path)
    client = redis_server.client()
    damaged = bytearray(client.get(key))
    damaged[-5] ^= 0xFF  # a flipped byte inside the last array
    client.set(key, bytes(damaged))
    reader = _store(tmp_path / "two", shared)
    assert reader.refresh(TAG, "a") is False  # downloaded (it held nothing hot)
    assert reader.checkout(TAG, "a") is None  # the checksum failed: a miss, it prefills
    assert reader.lookups[Lookup.REJECTED] == 1
    assert client.get(key) is None  # deleted, so no server takes it again
    del writer


def test_a_cache_over_the_value_limit_stays_local(tmp_path, redis_server):
    shared = SharedStore(redis_server.url, max_value_bytes=1000)
    path = tmp_path / TAG.digest / agent_file_name("big")
    size = shared.write_through(path, prepare_file(TAG, AgentCache("big", _layers(8),
                                                                   list(range(8)), TAG)))
    assert size > 1000 and path.exists()
    assert redis_server.client().get(SharedStore.cache_key(path)) is None


def test_redis_down_is_counted_and_its_password_never_shown(caplog):
    url = f"redis://:very-secret-password@127.0.0.1:{free_port()}/0"  # nobody listens
    shared = SharedStore(url, 2**20)
    with caplog.at_level(logging.DEBUG):
        assert shared.acquire("agent", shared.turn_token(), 30) is None  # the turn runs
        assert shared.get(Path("folder/file.safetensors")) is None
    assert shared.errors["lease"] == 1
    assert shared.where == f"redis://127.0.0.1:{url.rsplit(':', 1)[1]}"
    assert "very-secret-password" not in caplog.text and "very-secret" not in shared.where


def test_a_whole_copy_from_redis_frees_the_chunks_of_the_file_it_replaces(tmp_path,
                                                                        redis_server):
    # Before SEMANTIC_CACHE_STORE named Redis, this server kept the agent in chunks.
    folder = tmp_path / "server"
    local = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), folder,
                            chunk_tokens=4)
    local.add_model(FULL_TAG, FULL)
    local.checkin(_cache("a", list(range(8))))
    local.evict_all(FULL_TAG)
    chunks = folder / FULL_TAG.digest / CHUNKS
    assert len(list(chunks.glob("*.safetensors"))) == 1  # tokens 0-3 (a file keeps its last)
    # Another server's newer turn of the agent, in Redis (whole, as files are with Redis).
    shared = SharedStore(redis_server.url, 2**20)
    shared.write_through(tmp_path / "other" / FULL_TAG.digest / agent_file_name("a"),
                         prepare_file(FULL_TAG, _cache("a", list(range(12)))))
    store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), folder,
                            shared=shared)  # restarted with Redis: it indexes the chunks
    store.add_model(FULL_TAG, FULL)
    assert store.refresh(FULL_TAG, "a") is False  # brought into the folder (none hot)
    assert store.checkout(FULL_TAG, "a").tokens == list(range(12))
    assert list(chunks.glob("*.safetensors")) == []  # the old file's chunks are freed
    assert store.residency().cold_bytes == (
        folder / FULL_TAG.digest / agent_file_name("a")).stat().st_size


def test_a_password_with_reserved_characters_works_percent_encoded(tmp_path):
    # /, # and ? in the password: the URL holds it percent-encoded (RedisProcess.url), and
    # Redis gets it decoded; a copy brought from Redis is as private as any cache file.
    server = RedisProcess(password="pa/ss#wo?rd").start()
    before = os.umask(0)  # only the server's own modes keep its files private
    try:
        assert "%2F" in server.url and "%23" in server.url and "%3F" in server.url
        shared = SharedStore(server.url, 2**20)
        assert shared.acquire("agent", shared.turn_token(), 30) is True
        assert shared.errors == {}
        shared.write_through(tmp_path / "other" / TAG.digest / agent_file_name("a"),
                             prepare_file(TAG, AgentCache("a", _layers(8), list(range(8)))))
        folder = tmp_path / "server"
        store = AgentCacheStore(BlockPool(budget_bytes=2**20, block_tokens=4), folder,
                                shared=shared)
        store.add_model(TAG, DIMS)
        assert store.refresh(TAG, "a") is False  # brought into the folder (none hot)
        assert store.checkout(TAG, "a").tokens == list(range(8))
        modes = {path.name: stat.S_IMODE(path.stat().st_mode)
                 for path in [folder, *folder.rglob("*")]}
        assert modes == {"server": 0o700, TAG.digest: 0o700, "tag.json": 0o600,
                         agent_file_name("a"): 0o600}, modes
    finally:
        os.umask(before)
        server.stop()
