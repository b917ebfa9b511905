from __future__ import annotations

import pytest

from experiments.servers import ServerProcess
from tests.conftest import SMOLLM2


@pytest.fixture(scope="session")
def smol_server(models_dir):
    server = ServerProcess(SMOLLM2, max_context_tokens="2048").start()
    yield server
    server.stop()
