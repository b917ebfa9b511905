"""``Observer``: what the parts that do the work report as it happens.

The service reports each finished request, the orchestrator and the adapter swapper each
finished swap. They know only this protocol and the plain data it carries
(request_outcome.py, swap_result.py), so nothing that works depends on the Prometheus
metrics (observability.py) that implement it.
"""

from __future__ import annotations

from typing import Protocol

from semantic_server.request_outcome import Outcome
from semantic_server.swap_result import AdapterSwapResult, SwapResult


class Observer(Protocol):
    """What the parts that do the work report as it happens (the service, the swap)."""

    def request_finished(self, outcome: Outcome) -> None: ...

    def swap_finished(self, result: SwapResult) -> None: ...

    def adapter_swap_finished(self, result: AdapterSwapResult) -> None: ...
