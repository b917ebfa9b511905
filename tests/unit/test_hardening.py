"""Bad clients and faults, in process: clients that leave or stop reading, agents that
queue behind themselves, too many waiting requests, a KV budget shared with running
requests, an engine thread that dies, a swap whose caller goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest

from semantic_server.api.client_watch import ClientWatchMiddleware
from semantic_server.app import create_app
from semantic_server.engine.batch_engine import EngineStopped
from semantic_server.engine.gate import ServerState
from semantic_server.errors import AgentBusy, QueueFull, ServiceDegraded
from semantic_server.swap_result import SwapOutcome
from tests.fakes import DIMS, FakeGenerator, run_turn
from tests.polling import wait_until

pytestmark = pytest.mark.anyio


async def _asgi_call(app, receive, send) -> None:
    middleware = ClientWatchMiddleware(app, send_timeout=0.05)
    await middleware({"type": "http", "path": "/v1/chat/completions"}, receive, send)


async def test_a_client_that_disconnects_cancels_its_request_at_once():
    cancelled = asyncio.Event()
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    left = asyncio.Event()

    async def receive():
        if messages:
            return messages.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def app(scope, receive, send):  # a request held or computing, no byte sent yet
        await receive()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    call = asyncio.create_task(_asgi_call(app, receive, lambda message: None))
    await asyncio.sleep(0.01)
    assert not cancelled.is_set()
    left.set()
    await asyncio.wait_for(call, 5)
    assert cancelled.is_set()


async def test_a_client_that_stops_reading_is_cut_after_the_send_timeout():
    cancelled = asyncio.Event()
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # never disconnects, never reads

    async def send(message):
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()  # the socket's buffer is full

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"data: x\n\n",
                            "more_body": True})
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await asyncio.wait_for(_asgi_call(app, receive, send), 5)
    assert cancelled.is_set()


async def test_a_request_that_waits_for_its_agent_is_held_and_gives_up(start, fake_models):
    server = await start(swap_hold_seconds=0.2)
    fake_models["fake-a"].step_gate = threading.Event()
    first = asyncio.create_task(run_turn(server.service, "twin", "first"))
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    second = asyncio.create_task(run_turn(server.service, "twin", "second"))
    await wait_until(lambda: server.snapshot().held == 1)
    with pytest.raises(AgentBusy) as busy:
        await second
    assert busy.value.retry_after >= 1 and server.snapshot().held == 0
    fake_models["fake-a"].step_gate.set()
    assert (await first).text == "Hello from A."


async def test_waiting_requests_are_bounded(start, fake_models):
    server = await start(max_batch=1, max_queued=2)
    fake_models["fake-a"].step_gate = threading.Event()
    running = [asyncio.create_task(run_turn(server.service, f"q{i}", "hi")) for i in range(3)]
    await wait_until(lambda: server.service.queued == 2)  # one runs, two wait their turn
    with pytest.raises(QueueFull) as full:
        await run_turn(server.service, "q3", "hi")
    assert full.value.retry_after >= 1
    fake_models["fake-a"].step_gate.set()
    assert [r.text for r in await asyncio.gather(*running)] == ["Hello from A."] * 3
    assert server.service.queued == 0


async def test_running_requests_reserve_kv_and_wait_for_room(start, fake_models):
    # A budget of 8 blocks of 16 tokens: one request (its prompt plus max_tokens) takes
    # most of it, so a second waits in the engine's queue until the first ends.
    server = await start(kv_budget_bytes=8 * 16 * DIMS.bytes_per_token, block_tokens=16)
    pool = server.pool
    assert pool.budget_bytes == 8 * pool.block_bytes(DIMS)
    fake_models["fake-a"].step_gate = threading.Event()
    first = asyncio.create_task(run_turn(server.service, "big-1", "hi", max_tokens=60))
    second = asyncio.create_task(run_turn(server.service, "big-2", "hi", max_tokens=60))
    await wait_until(lambda: server.snapshot().queued == 1)  # the second waits for room
    assert server.snapshot().active_sequences == 1
    assert pool.used + pool.reserved <= pool.budget_bytes
    fake_models["fake-a"].step_gate.set()
    await asyncio.gather(first, second)
    assert pool.reserved == 0 and pool.used <= pool.budget_bytes


async def test_an_engine_thread_that_dies_degrades_the_server_at_once(server, fake_models):
    # The fault is injected (a BaseException from the fake generator's step), since no real
    # input makes the engine thread die; the fake stands in for the model only.
    fake_models["fake-a"].step_fault = SystemExit("injected fault")
    with pytest.raises(Exception, match="generation failed"):
        await run_turn(server.service, "victim", "hi")
    snapshot = server.snapshot()
    assert snapshot.state is ServerState.DEGRADED and "injected fault" in snapshot.reason
    assert "injected" not in snapshot.public_reason
    with pytest.raises(ServiceDegraded):
        await run_turn(server.service, "next", "hi")
    with pytest.raises(EngineStopped):
        await server.engine.on_thread(lambda: None)  # no command hangs either


async def test_a_swap_whose_caller_leaves_still_finishes(server, fake_models):
    fake_models["fake-b"].load_gate = threading.Event()
    caller = asyncio.create_task(server.orchestrator.swap("fake-b"))
    await wait_until(lambda: fake_models["fake-b"].loads == 1)
    caller.cancel()  # the admin client disconnected mid-swap
    fake_models["fake-b"].load_gate.set()
    await wait_until(lambda: server.orchestrator.history)
    assert server.orchestrator.history[-1].status is SwapOutcome.SUCCESS
    assert server.gate.state is ServerState.READY and server.snapshot().model_id == "fake-b"


# The real app over fake models, called as uvicorn calls it: its receive() reports
# http.disconnect once the response's last body message is sent (uvicorn's
# RequestResponseCycle does so), or when the client really leaves.


def _asgi_app(server):
    app = create_app(server.settings, registry=server.registry,
                     make_generator=FakeGenerator.factory)
    app.state.server = server  # the lifespan's work, done by the fixture
    return app


def _scope(body: bytes) -> dict:
    return {"type": "http", "method": "POST", "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
            "scheme": "http", "http_version": "1.1", "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 40000),
            "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


STREAM = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                     "stream": True}).encode()


def _left(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "client left" in r.getMessage()]


def _request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "request"]


async def test_a_stream_read_to_the_end_is_finished_not_a_client_that_left(start, caplog):
    server = await start()
    app = _asgi_app(server)
    complete = asyncio.Event()  # the response's last body message was sent
    parts = [{"type": "http.request", "body": STREAM, "more_body": False}]
    sent: list = []

    async def receive():
        if parts:
            return parts.pop(0)
        await complete.wait()  # uvicorn: response_complete -> http.disconnect
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    caplog.set_level(logging.INFO)
    await asyncio.wait_for(app(_scope(STREAM), receive, send), 5)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[0]["status"] == 200 and body.rstrip().endswith(b"data: [DONE]")
    assert _left(caplog) == []
    lines = _request_lines(caplog)
    assert len(lines) == 1 and lines[0].fields["status"] == 200
    assert server.snapshot().active_sequences == 0 and server.gate.in_flight == 0


async def test_a_client_that_leaves_mid_stream_is_logged_and_its_request_cancelled(
        start, fake_models, caplog):
    server = await start()
    fake_models["fake-a"].step_gate = threading.Event()  # the stream stays open
    app = _asgi_app(server)
    streaming = asyncio.Event()  # the response has started
    left = asyncio.Event()
    parts = [{"type": "http.request", "body": STREAM, "more_body": False}]

    async def receive():
        if parts:
            return parts.pop(0)
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        streaming.set()

    caplog.set_level(logging.INFO)
    call = asyncio.create_task(app(_scope(STREAM), receive, send))
    await asyncio.wait_for(streaming.wait(), 5)
    await wait_until(lambda: server.snapshot().active_sequences == 1)
    left.set()
    await asyncio.wait_for(call, 5)
    assert len(_left(caplog)) == 1
    assert _request_lines(caplog) == []  # never logged as finished
    await wait_until(lambda: server.snapshot().active_sequences == 0)
    fake_models["fake-a"].step_gate.set()
