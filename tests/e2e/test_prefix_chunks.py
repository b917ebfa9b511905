"""Content-addressed prefix chunks on a real server (SmolLM2), through the official client:
a system prompt agents share is on disk once, and after a restart a new agent starts from
it instead of prefilling it.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from tests.conftest import SMOLLM2
from tests.servers import ServerProcess

CHUNK_TOKENS = 128  # the default SEMANTIC_CACHE_CHUNK_TOKENS
SYSTEM = {"role": "system", "content": "You keep the harbour's ledgers. " + " ".join(
    f"Rule {i}: every entry names the ship, its cargo and the day it came in."
    for i in range(24))}


def _ask(server: ServerProcess, agent: str, question: str, history: list | None = None):
    messages = [SYSTEM, *(history or []), {"role": "user", "content": question}]
    reply = server.client(agent).chat.completions.create(
        model=SMOLLM2, messages=messages, max_tokens=8, temperature=0)
    return reply, messages


def _listed_chunks(cache_dir: Path) -> list[str]:
    """Every chunk every agent's file lists (with repeats)."""
    listed = []
    for path in cache_dir.glob("*/*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            listed += json.loads(handle.metadata()["chunks"]).get("keys", [])
    return listed


def test_a_shared_system_prompt_is_on_disk_once_and_seeds_new_agents_after_a_restart(
        tmp_path):
    server = ServerProcess(SMOLLM2, cache_dir=str(tmp_path)).start()
    try:
        first, _ = _ask(server, "ledger-1", "Which ships came in today?")
        _ask(server, "ledger-2", "Who keeps the ledgers?")  # starts from ledger-1's, hot
    finally:
        server.stop()  # a clean shutdown writes every hot cache
    system_tokens = first.usage.prompt_tokens - 12  # the question and the template's tail
    assert system_tokens > 3 * CHUNK_TOKENS, first.usage.prompt_tokens
    listed = _listed_chunks(tmp_path)
    chunks = list(tmp_path.glob("*/chunks/*.safetensors"))
    assert len(listed) > len(chunks) == len(set(listed))  # the shared ones once
    assert len(listed) - len(chunks) >= 3  # at least 3 chunks of the system prompt shared

    server = ServerProcess(SMOLLM2, cache_dir=str(tmp_path)).start()
    try:
        fresh, _ = _ask(server, "ledger-3", "Where is the harbour master?")
        cached = fresh.usage.prompt_tokens_details.cached_tokens
        assert cached >= 3 * CHUNK_TOKENS and cached % CHUNK_TOKENS == 0, cached
        assert cached <= system_tokens + 12, cached  # the prefix it shares, never more
        assert fresh.choices[0].message.content
        again, _ = _ask(server, "ledger-1", "And yesterday?", history=[
            {"role": "user", "content": "Which ships came in today?"},
            {"role": "assistant", "content": first.choices[0].message.content}])
        details = again.usage.prompt_tokens_details  # its own file, chunks and tail
        assert details.cached_tokens >= 0.9 * first.usage.prompt_tokens, details
    finally:
        server.stop()
