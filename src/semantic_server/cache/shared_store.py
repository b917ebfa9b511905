"""Agents' caches shared by several servers through Redis (``SEMANTIC_CACHE_STORE=redis://``).

Each server keeps its hot caches in memory and its cold ones in its own folder, as with
the file store; with Redis, every cache file it writes (an eviction, and the end of every
agent turn) is also a Redis value, so any server can resume any agent: a server that has
no newer copy of an agent's cache downloads it before the agent's turn. Keys are derived
from the cache tag and the hashed agent id (the file's own name), never the agent id.

A running turn holds its agent's *lease* (``SET NX PX``, renewed while it runs, released
at its end), so two servers never run one agent at once; a server that dies loses its
leases when they expire.

Redis is a help, never a dependency: every call has a short timeout, a failed call is
counted and logged (without the URL, so without its password), and Redis is left alone for
a moment before the next try; meanwhile the server serves from memory and its folder.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis

from semantic_server.agent_ids import hash_agent
from semantic_server.cache.cache_file import PreparedFile, write_prepared
from semantic_server.config import redis_url_problem

log = logging.getLogger(__name__)
T = TypeVar("T")
PREFIX = "semantic"
RETRY_SECONDS = 1.0  # after a failed call, how long Redis is left alone
TIMEOUT_SECONDS = 5.0  # any one call (a 100 MB value takes well under a second locally)

# Renew a lease only if this server still holds it; release likewise (never another's).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
         "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then " \
           "return redis.call('del', KEYS[1]) else return 0 end"
# Share a cache unless the shared copy holds more tokens (a newer turn, from another
# server): an older copy spilled late never replaces a newer one.
_PUT = "local held = tonumber(redis.call('get', KEYS[2]) or '-1') " \
       "if held > tonumber(ARGV[2]) then return 0 end " \
       "redis.call('set', KEYS[1], ARGV[1]) redis.call('set', KEYS[2], ARGV[2]) return 1"


def redacted(url: str) -> str:
    """``url`` without its user name and password, for logs and errors: its host, port and
    database, or less when the URL does not parse as a valid one (then parts of a password
    can stand where they would be)."""
    if redis_url_problem(url) is not None:
        return "redis://(an invalid URL)"
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class SharedStore:
    """Cache files as Redis values, and agent leases (thread-safe: the writer thread, the
    event loop's threads and the engine thread all call it)."""

    def __init__(self, url: str, max_value_bytes: int) -> None:
        if (problem := redis_url_problem(url)) is not None:  # never quoting the URL
            raise ValueError(f"SEMANTIC_CACHE_STORE {problem}")
        self.where = redacted(url)
        self.max_value_bytes = max_value_bytes
        self.server_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_SECONDS,
                                            socket_connect_timeout=TIMEOUT_SECONDS)
        self.errors: Counter[str] = Counter()  # failed calls, by operation
        self._lock = threading.Lock()
        self._quiet_until = 0.0

    # ---- keys ------------------------------------------------------------------------
    @staticmethod
    def cache_key(path: Path) -> str:
        """A cache file's key: its tag folder's digest and its (hashed) agent file name."""
        return f"{PREFIX}:cache:{path.parent.name}:{path.stem}"

    @staticmethod
    def tokens_key(path: Path) -> str:
        """How many tokens the shared cache holds: a history only grows, so more is newer."""
        return f"{PREFIX}:tokens:{path.parent.name}:{path.stem}"

    @staticmethod
    def lease_key(agent_id: str) -> str:
        return f"{PREFIX}:lease:{hash_agent(agent_id)}"

    # ---- calls -----------------------------------------------------------------------
    def _call(self, operation: str, call: Callable[[], T], always: bool = False) -> T | None:
        """``call``'s result, or None when Redis failed (or, unless ``always``, failed a
        moment ago)."""
        if not always and time.monotonic() < self._quiet_until:
            return None
        try:
            return call()
        except redis.RedisError as exc:
            with self._lock:
                self.errors[operation] += 1
                self._quiet_until = time.monotonic() + RETRY_SECONDS
            log.warning("Redis %s failed at %s: %s", operation, self.where,
                        type(exc).__name__)
            return None

    def put(self, path: Path, tokens: int) -> bool:
        """Share the cache file at ``path``, of ``tokens`` tokens (False: too large,
        unreadable, or Redis failed; the file stays local either way)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cache file %s not shared: %s", path.name, exc)
            return False
        if len(data) > self.max_value_bytes:
            log.info("cache file %s kept local: %d bytes, over %d", path.name, len(data),
                     self.max_value_bytes)
            return False
        shared = self._call("put", lambda: self._client.eval(
            _PUT, 2, self.cache_key(path), self.tokens_key(path), data, tokens))
        return shared == 1

    def tokens(self, path: Path) -> int | None:
        """How many tokens the shared copy of ``path`` holds; None: none (or no Redis)."""
        value: Any = self._call("get", lambda: self._client.get(self.tokens_key(path)))
        return int(value) if value is not None else None

    def get(self, path: Path) -> bytes | None:
        value: Any = self._call("get", lambda: self._client.get(self.cache_key(path)))
        return value if isinstance(value, bytes) else None

    def delete(self, path: Path) -> None:
        self._call("delete", lambda: self._client.delete(self.cache_key(path),
                                                          self.tokens_key(path)))

    def write_through(self, path: Path, prepared: PreparedFile) -> int:
        """The writer thread's write: the file, then its copy in Redis."""
        size = write_prepared(path, prepared)
        self.put(path, int(prepared.metadata["token_count"]))
        return size

    # ---- leases ----------------------------------------------------------------------
    def turn_token(self) -> str:
        """What one turn's lease holds: this server's id and the turn's own random part, so
        a late release of an earlier turn never frees a later one."""
        return f"{self.server_id}:{secrets.token_hex(8)}"

    def acquire(self, agent_id: str, token: str, seconds: float) -> bool | None:
        """Take ``agent_id``'s lease as ``token`` for ``seconds`` if no turn holds it: True
        when taken, False when another turn (of any server) holds it, None when Redis
        cannot say (then the turn runs: availability before strictness)."""
        return self._call("lease", lambda: bool(self._client.set(
            self.lease_key(agent_id), token, nx=True, px=int(seconds * 1000))))

    def renew(self, agent_id: str, token: str, seconds: float) -> None:
        self._call("lease", lambda: self._client.eval(
            _RENEW, 1, self.lease_key(agent_id), token, int(seconds * 1000)))

    def release(self, agent_id: str, token: str) -> None:
        """Free the lease if ``token`` still holds it (tried even right after a failure:
        a lease left behind holds the agent until it expires)."""
        self._call("lease", lambda: self._client.eval(
            _RELEASE, 1, self.lease_key(agent_id), token), always=True)

    def close(self) -> None:
        self._client.close()
