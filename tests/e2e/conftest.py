from __future__ import annotations

import pytest

from tests.conftest import SMOLLM2
from tests.servers import ServerProcess


@pytest.fixture(scope="session")
def smol_server(models_dir):
    server = ServerProcess(SMOLLM2, max_context_tokens="2048").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def twin(models_dir, tmp_path_factory):
    """SmolLM2 under a second name (a symlinked directory): another model to the server,
    as large as the first and loaded in a second where Gemma's first load takes ten. Tests
    of swap mechanics under load use it; tests of what differs between architectures use
    Gemma."""
    alias = tmp_path_factory.mktemp("models") / f"{SMOLLM2}-twin"
    alias.symlink_to(models_dir / SMOLLM2)
    return alias
