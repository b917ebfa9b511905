"""Stored responses of the Responses API (``store: true``): what ``previous_response_id``
continues from, and what ``GET /v1/responses/{id}`` returns.

A record holds its tenant, the agent whose KV cache holds its context, the conversation
as input items up to and including its own output (so a continuation renders the same
tokens the agent's cache holds and prefills only what is new), and the response object.
The KV itself is never here: it is the agent's cache, which survives restarts and swaps
like any other. Records are small JSON files beside the caches, written atomically and
private to the server's user; a record is found only under its own tenant (another
tenant's id is simply not there: a 404, so ids do not leak). Every method reads or
writes the disk: call them off the event loop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from semantic_server.cache.cache_file import private_folder, write_atomically

FOLDER = "responses"


@dataclass(frozen=True)
class ResponseRecord:
    id: str
    tenant: str | None
    agent: str | None
    items: list[dict[str, Any]]  # the conversation so far, as Responses input items
    response: dict[str, Any]  # the response object, as created


class ResponseRecords:
    def __init__(self, cache_dir: Path) -> None:
        self.folder = cache_dir / FOLDER

    def _path(self, tenant: str | None, response_id: str) -> Path:
        key = json.dumps([tenant, response_id]).encode("utf-8", "surrogatepass")
        return self.folder / f"{hashlib.blake2b(key, digest_size=20).hexdigest()}.json"

    def put(self, record: ResponseRecord) -> None:
        private_folder(self.folder)  # 0700, and the file 0600 (write_atomically)
        data = json.dumps(asdict(record), ensure_ascii=False).encode("utf-8", "surrogatepass")
        write_atomically(self._path(record.tenant, record.id), lambda tmp: tmp.write_bytes(data))

    def get(self, tenant: str | None, response_id: str) -> ResponseRecord | None:
        """The tenant's record of ``response_id``; None when there is none (or it cannot be
        read: a damaged record is a missing one, never a failed request)."""
        try:
            data = json.loads(self._path(tenant, response_id).read_bytes())
            record = ResponseRecord(**data)
        except (OSError, ValueError, TypeError):
            return None
        return record if record.tenant == tenant and record.id == response_id else None

    def delete(self, tenant: str | None, response_id: str) -> bool:
        if self.get(tenant, response_id) is None:
            return False
        self._path(tenant, response_id).unlink(missing_ok=True)
        return True
