from __future__ import annotations

import pytest

from tests.conftest import SMOLLM2
from tests.e2e.server import ServerProcess


@pytest.fixture(scope="session")
def smol_server(models_dir):
    server = ServerProcess(SMOLLM2, max_context_tokens="2048").start()
    yield server
    server.stop()
