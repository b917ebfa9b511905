"""The admission gate: which requests may start, and waiting for running ones to finish.

A swap must change the model under no running request, and a request must run entirely on
one model. The gate counts requests in flight; a swap closes it and waits for the count
to reach zero (drain). Requests that arrive while it is closed are held, not refused,
until the swap ends or ``hold_seconds`` pass. All methods run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum

from semantic_server.errors import ServerBusy, ServiceDegraded

log = logging.getLogger(__name__)
# What anyone may read about a degraded server; the reason itself (exception text, paths)
# is for the admin API and the logs.
DEGRADED_PUBLIC = ("no model is serving: a swap failed and so did its rollback; an operator "
                   "must swap to a working model (details in the admin API)")


class ServerState(StrEnum):
    READY = "ready"
    SWAPPING = "swapping"
    DEGRADED = "degraded"


# The allowed transitions, in one place.
_TRANSITIONS = {
    ServerState.READY: {ServerState.SWAPPING},
    ServerState.SWAPPING: {ServerState.READY, ServerState.DEGRADED},
    ServerState.DEGRADED: {ServerState.SWAPPING},
}


class AdmissionGate:
    def __init__(self, hold_seconds: float) -> None:
        self.hold_seconds = hold_seconds
        self.state = ServerState.READY
        self.degraded_reason = ""
        self.in_flight = 0
        self.held = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    def transition(self, state: ServerState, reason: str = "") -> None:
        if state not in _TRANSITIONS[self.state]:
            raise RuntimeError(f"server state cannot go from {self.state.value} to {state.value}")
        log.info("server state", extra={"fields": {"from": self.state.value, "to": state.value}})
        self.state = state
        self.degraded_reason = reason if state is ServerState.DEGRADED else ""
        if state is ServerState.SWAPPING:
            self._open.clear()
        else:
            self._open.set()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Run the body as one in-flight request, waiting out a swap first."""
        if not self._open.is_set():
            self.held += 1
            deadline = asyncio.get_running_loop().time() + self.hold_seconds
            try:
                # Another swap may close the gate again between our wake-up and our turn.
                while not self._open.is_set():
                    remaining = deadline - asyncio.get_running_loop().time()
                    await asyncio.wait_for(self._open.wait(), max(remaining, 0))
            except TimeoutError:
                raise ServerBusy("a model swap is in progress; retry shortly",
                                 retry_after=max(1, round(self.hold_seconds))) from None
            finally:
                self.held -= 1
        if self.state is ServerState.DEGRADED:
            raise ServiceDegraded(DEGRADED_PUBLIC)
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Wait until no request runs; False when ``timeout`` passes first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False
