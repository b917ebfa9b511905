"""What a swap reports when it ends, plain data: ``SwapResult`` (a model swap, load or
unload, with the path it took and its timed steps) and ``AdapterSwapResult``.

The orchestrator and the adapter swapper (swap/) fill them in; the admin API returns them,
and the observer (observer.py) counts them. Which steps each path runs, in which order, is
the orchestrator's (``SEQUENTIAL_STEPS``, ``DUAL_STEPS``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class SwapMode(StrEnum):
    """Which path a swap takes; ``auto`` picks dual when the target fits beside."""

    AUTO = "auto"
    DUAL = "dual"
    SEQUENTIAL = "sequential"


class SwapKind(StrEnum):
    """What a model operation changes."""

    SWAP = "swap"  # another model serves the requests that name no model
    LOAD = "load"  # a model loads beside the resident ones
    UNLOAD = "unload"  # a model loaded beside leaves


class SwapStep(StrEnum):
    """The steps of both paths."""

    DRAIN = "drain"
    EVICT = "evict"
    SHUTDOWN = "shutdown"
    UNLOAD = "unload"
    LOAD = "load"
    RECONFIGURE = "reconfigure"
    RETAG = "retag"
    REINIT = "reinit"
    WARM = "warm"
    PROMOTE = "promote"
    RETIRE = "retire"


class SwapOutcome(StrEnum):
    SUCCESS = "success"
    ABORTED = "aborted"  # stopped before anything was unloaded: the old model serves on
    ROLLED_BACK = "rolled_back"  # the target failed to come up; the old model is back
    DEGRADED = "degraded"  # the rollback failed too: no model serves


@dataclass
class StepTiming:
    name: SwapStep
    duration_ms: float
    ok: bool


@dataclass
class SwapResult:
    status: SwapOutcome
    old_model_id: str | None  # the model that left (a swap's, an unload's), if any
    new_model_id: str | None  # the model that came (a swap's, a load's), if any
    mode: SwapMode = SwapMode.SEQUENTIAL  # the path that ran
    kind: SwapKind = SwapKind.SWAP
    message: str = ""
    duration_ms: float = 0.0
    steps: list[StepTiming] = field(default_factory=list)
    rollback_steps: list[StepTiming] = field(default_factory=list)
    evicted_agents: int = 0
    failed_step: SwapStep | None = None
    promotion_pause_ms: float | None = None  # dual: how long nobody could be admitted
    memory: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class AdapterSwapOutcome(StrEnum):
    SUCCESS = "success"
    FAILED = "failed"  # the copy failed: the model kept its adapter


@dataclass
class AdapterSwapResult:
    """One adapter swap, as ``/admin/swaps`` and the swap's response show it."""

    status: AdapterSwapOutcome
    model_id: str
    old_adapter: str | None
    new_adapter: str | None
    fingerprint: str | None = None  # the new adapter's
    slot: int = 0  # the prepared slot it is in (0: no adapter)
    copied: bool = False  # False: it was already resident in a slot
    check_ms: float = 0.0
    copy_ms: float = 0.0
    switch_ms: float = 0.0
    duration_ms: float = 0.0
    message: str = ""
    kind: str = "adapter"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
