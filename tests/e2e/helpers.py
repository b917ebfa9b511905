"""What the end-to-end tests share: the admin key, greedy sampling, a long history, a swap
call and a metrics scrape against a real server process."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from semantic_server.swap import orchestrator
from tests.servers import ServerProcess

KEY = "test-admin-key"
ADMIN = {"X-Admin-Key": KEY}
GREEDY = {"temperature": 0}
HISTORY = (
    "Here are my notes about the expedition. The team left the harbour at dawn, crossed "
    "the strait, and set up camp near the old lighthouse. They measured the tides, counted "
    "the birds on the cliffs and wrote down everything the fishermen told them. "
) * 30


SEQUENTIAL_STEPS = [step.value for step in orchestrator.SEQUENTIAL_STEPS]
DUAL_STEPS = [step.value for step in orchestrator.DUAL_STEPS]


def swap(server: ServerProcess, model_id: str, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models/swap", json={"model_id": model_id, **extra},
                      headers=ADMIN, timeout=600)


def scrape(server: ServerProcess) -> dict[tuple, float]:
    response = httpx.get(f"{server.url}/metrics", timeout=30)
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(sample for (sample_name, sample_labels), sample in samples.items()
               if sample_name == name and wanted <= set(sample_labels))
