"""The admission gate's states and holds, and stop strings cut across token boundaries."""

from __future__ import annotations

import asyncio

import pytest

from semantic_server.engine.gate import AdmissionGate, ServerState
from semantic_server.engine.service import StopStrings
from semantic_server.errors import ServerBusy, ServiceDegraded
from tests.polling import wait_until

pytestmark = pytest.mark.anyio


async def test_a_swap_holds_new_requests_until_it_ends():
    gate = AdmissionGate(hold_seconds=5)
    gate.transition(ServerState.SWAPPING)
    ran = []

    async def request() -> None:
        async with gate.admit():
            ran.append(gate.state)

    waiting = asyncio.create_task(request())
    await wait_until(lambda: gate.held == 1)
    assert ran == []
    gate.transition(ServerState.READY)
    await waiting
    assert ran == [ServerState.READY] and gate.held == 0 and gate.in_flight == 0


async def test_a_held_request_gives_up_after_the_hold_with_retry_after():
    gate = AdmissionGate(hold_seconds=0.05)
    gate.transition(ServerState.SWAPPING)
    with pytest.raises(ServerBusy) as busy:
        async with gate.admit():
            pass
    assert busy.value.retry_after >= 1 and gate.held == 0


async def test_degraded_refuses_with_the_reason_and_a_swap_may_recover():
    gate = AdmissionGate(hold_seconds=1)
    gate.transition(ServerState.SWAPPING)
    gate.transition(ServerState.DEGRADED, "rollback failed: disk gone")
    with pytest.raises(ServiceDegraded) as refused:
        async with gate.admit():
            pass
    # anyone may read that the server is degraded; the reason itself is for the admin API
    assert "disk gone" not in str(refused.value) and "disk gone" in gate.degraded_reason
    with pytest.raises(RuntimeError):
        gate.transition(ServerState.READY)  # only a swap leaves degraded
    gate.transition(ServerState.SWAPPING)
    gate.transition(ServerState.READY)
    assert gate.degraded_reason == ""


async def test_drain_waits_for_running_requests_and_times_out():
    gate = AdmissionGate(hold_seconds=1)
    release = asyncio.Event()

    async def request() -> None:
        async with gate.admit():
            await release.wait()

    running = asyncio.create_task(request())
    await wait_until(lambda: gate.in_flight == 1)
    assert await gate.drain(0.01) is False
    draining = asyncio.create_task(gate.drain(5))
    release.set()
    assert await draining is True
    await running


def _feed(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, StopStrings]:
    cut = StopStrings(stops)
    out = "".join(cut.feed(piece) for piece in pieces) + cut.flush()
    return out, cut


@pytest.mark.parametrize(("stops", "pieces", "text", "matched"), [
    (("END",), ["Hello E", "N", "D more"], "Hello ", "END"),
    (("END",), ["Hello E", "NOUGH"], "Hello ENOUGH", None),  # a false start is released
    (("ab", "xyzab"), ["..xyz", "a", "b"], "..", "xyzab"),  # the earliest match wins
    (("aab",), ["a", "a", "a", "b"], "a", "aab"),  # overlapping prefixes
    ((), ["free", " text"], "free text", None),
])
def test_stop_strings(stops, pieces, text, matched):
    out, cut = _feed(stops, pieces)
    assert out == text and cut.matched == matched


def test_held_back_text_is_only_what_may_start_a_stop_string():
    cut = StopStrings(("STOP",))
    assert cut.feed("go ST") == "go "
    assert cut.feed("x") == "STx"


def test_held_back_text_stays_within_the_longest_stop_string():
    # The text kept between tokens (what each token's search looks at) never grows with
    # the generation: a long almost-matching stream costs the same per token throughout.
    stop = "a" * 255 + "b"
    cut = StopStrings((stop,))
    for _ in range(2000):
        cut.feed("a")
        assert len(cut.pending) < len(stop)
    assert cut.feed("b") == "" and cut.matched == stop
