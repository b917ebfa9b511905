"""Waiting for a condition in a test: every wait polls at an interval and has a deadline,
so no test spins on a core or hangs when what it waits for never happens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], object], timeout: float = 30.0,
             interval: float = 0.02, what: str = "condition") -> None:
    """Poll ``condition`` from a plain thread until it is true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not met after {timeout} s"
        time.sleep(interval)  # polling with a deadline, not covering a race


async def wait_until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition`` on the event loop every few ms until it holds; fail after
    ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
