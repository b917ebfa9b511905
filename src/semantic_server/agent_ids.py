"""What the logs and the shared store show of an agent id: a short hash of it.

Agent ids can be user names, so a log line or a Redis key names an agent by this hash,
never by its id (cache file names hash it too, longer: cache/cache_file.py).
"""

from __future__ import annotations

import hashlib


def hash_agent(agent_id: str | None) -> str | None:
    """A short, stable stand-in for ``agent_id`` (None for an anonymous request)."""
    return hashlib.sha256(agent_id.encode()).hexdigest()[:12] if agent_id else None
