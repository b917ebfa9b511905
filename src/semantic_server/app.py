"""The HTTP application (in progress: the serving issue builds it)."""

from __future__ import annotations

from semantic_server.config import Settings


def run(settings: Settings) -> None:
    raise SystemExit("semantic-server: the HTTP server is not built yet")
