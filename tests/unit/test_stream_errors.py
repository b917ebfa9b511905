"""A generation that fails after its stream began: the client gets one error event in its
API's shape and no sign of success. A stream its consumer stops closes the generation.

The generations are simulated (iterators that raise, or never end), because a real engine
fault cannot be caused on demand; the stream code under test is the real one.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from semantic_server.api.anthropic_routes import _events
from semantic_server.api.openai_routes import _sse
from semantic_server.api.turn import collect
from semantic_server.engine.service import Admitted
from semantic_server.errors import GenerationFailed

ADMITTED = Admitted("m", 3, 0)


async def failing():
    """Two text deltas, then the engine fails."""
    yield "Hel"
    yield "lo"
    raise GenerationFailed("generation failed")


async def _stream(make_events) -> list[str]:
    return [event async for event in make_events(failing())]


def test_openai_stream_ends_with_an_error_object_and_no_done():
    events = asyncio.run(_stream(lambda items: _sse(items, "id", 0, ADMITTED, True)))
    assert [json.loads(e[6:])["choices"][0]["delta"] for e in events[:3]] == [
        {"role": "assistant", "content": ""}, {"content": "Hel"}, {"content": "lo"}]
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "generation_failed" and error["type"] == "server_error"
    assert len(events) == 4 and "[DONE]" not in "".join(events)


def test_anthropic_stream_ends_with_an_error_event_and_no_message_stop():
    events = asyncio.run(_stream(lambda items: _events(items, "msg", ADMITTED, False)))
    names = [e.split("\n", 1)[0].removeprefix("event: ") for e in events]
    assert names == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "error"]
    body = json.loads(events[-1].split("data: ", 1)[1])
    assert body == {"type": "error", "error": {"type": "api_error",
                                               "message": "generation failed"}}


@pytest.mark.parametrize("stream", ["openai", "anthropic"])
def test_a_stream_its_client_leaves_closes_the_generation(stream):
    closed = []

    async def endless():
        try:
            while True:
                yield "x"
        finally:
            closed.append(True)  # where the real generation cancels its engine job

    async def leave_after_three_events():
        items = endless()
        events = (_sse(items, "id", 0, ADMITTED, False) if stream == "openai"
                  else _events(items, "msg", ADMITTED, False))
        for _ in range(3):
            await anext(events)
        assert closed == []
        await events.aclose()  # what a cancelled response does to its body
        assert closed == [True]  # at once, not whenever the garbage collector gets to it

    asyncio.run(leave_after_three_events())


def test_a_failure_before_any_byte_keeps_its_status():
    async def run():
        await collect(failing())

    with pytest.raises(GenerationFailed):
        asyncio.run(run())
