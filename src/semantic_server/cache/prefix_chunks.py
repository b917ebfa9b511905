"""Content-addressed prefix chunks: what names a chunk of a cache, and whose chunks may be
shared.

Agents of one deployment share long prefixes (the system prompt and tools), so a cache file
keeps the full-attention layers of its complete chunks (``SEMANTIC_CACHE_CHUNK_TOKENS``
tokens each, default ``config.CHUNK_TOKENS``) in files of their own, named by a hash of
everything that decides their KV: the cache tag (model, weights, adapter), the disk
format, the tenant, and every token up to the chunk's end.
Equal names mean equal KV, so a chunk several agents hold is written once, and a new
agent's prompt names the chunks it could start from before anything is read.

The tenant is in the name so no tenant reads another's chunks: what a prefix's
``cached_tokens`` tells would otherwise show one tenant another's prompts.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

CHUNKS = "chunks"  # the folder of a tag's chunks, beside its agents' files


def tenant_of(agent_id: str) -> str | None:
    """The tenant an agent id belongs to ("<tenant>/<agent>" when API keys are set)."""
    tenant, slash, _ = agent_id.partition("/")
    return tenant if slash else None


def chunk_keys(tag_digest: str, disk_format: str, tenant: str | None, tokens: list[int],
               chunk_tokens: int, limit: int | None = None) -> list[str]:
    """The names of the complete chunks of ``tokens`` (at most ``limit``): each hashes the
    tag, format, chunk size, tenant and every token up to the chunk's end (a running hash,
    so naming every chunk costs one pass over the tokens)."""
    running = hashlib.sha256(
        f"{tag_digest}|{disk_format}|{chunk_tokens}|{tenant or ''}|".encode())
    count = len(tokens) // chunk_tokens if limit is None else min(limit,
                                                                   len(tokens) // chunk_tokens)
    keys = []
    for index in range(count):
        running.update(array("i", tokens[index * chunk_tokens:(index + 1) * chunk_tokens]))
        keys.append(running.copy().hexdigest()[:32])
    return keys


def chunk_path(folder: Path, key: str) -> Path:
    """Where chunk ``key`` of the caches in ``folder`` (one tag's) lives."""
    return folder / CHUNKS / f"{key}.safetensors"
