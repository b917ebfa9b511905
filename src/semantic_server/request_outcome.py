"""How a request ended: ``Outcome`` (and its ``FinishReason``), plain data.

The engine reports why a generation ended, the service fills in the rest as the request
runs; the API turns it into a usage block and the observer (observer.py) counts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum


class FinishReason(StrEnum):
    """Why a generation ended."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # removed from the batch: its client left, or a stop string hit


@dataclass
class Outcome:
    """How a request ended, for the usage block and the logs."""

    model_id: str
    fingerprint: str  # of the weights that served it: its model version
    finish_reason: FinishReason = FinishReason.STOP
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_seconds: float | None = None
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # end to end, set when the request finishes
