"""Watch every request's client for its whole life, and let go of the ones that left.

A request holds scarce things while it runs: a gate slot (a swap waits for it), its
agent's lock (the agent's next request waits for it) and a batch slot. Nothing in
Starlette notices a client that disconnects while a request is held, queued or being
computed without streaming, and a streaming client that stops reading blocks ``send``
forever. This plain ASGI middleware runs the app as a task and, once the request body has
been read, listens for ``http.disconnect``: when it comes, the task is cancelled at once,
which cancels the request's engine job (the agent keeps what its cache holds) and frees
its slot and lock. A ``send`` that does not complete within ``send_timeout`` seconds (a
client that stopped reading) is treated the same way, and the connection is dropped.

Once the app has sent its response's last body message the client is served: uvicorn then
reports ``http.disconnect`` too (its ``receive`` says so as soon as a response is complete),
and that is neither a client that left nor a reason to cancel what the app still does (its
logs, its cache's check-in); the request is logged as finished by the service.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

Message = dict[str, Any]


class ClientWatchMiddleware:
    def __init__(self, app: Any, send_timeout: float) -> None:
        self.app = app
        self.send_timeout = send_timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = asyncio.Event()  # the client left (or stopped reading) before it was served
        disconnected = asyncio.Event()  # the connection reported http.disconnect
        body_read = asyncio.Event()
        # the app handed over its response's last body message: from then on a disconnect
        # is the end of a served request (set before that send returns, since uvicorn may
        # report the disconnect to the watcher first)
        responded = False

        def disconnect() -> None:
            disconnected.set()
            if not responded:
                gone.set()

        async def watched_receive() -> Message:
            if body_read.is_set():  # from now on only the watcher reads the socket
                await disconnected.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnect()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def watch() -> None:
            await body_read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnect()

        async def timed_send(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body"):
                responded = True
            try:
                await asyncio.wait_for(send(message), self.send_timeout)
            except TimeoutError:
                log.warning("client stopped reading", extra={"fields": {
                    "request_id": scope.get("state", {}).get("request_id"),
                    "send_timeout_s": self.send_timeout}})
                gone.set()
                disconnected.set()
                await asyncio.Event().wait()  # until the task is cancelled, just below

        app_task = asyncio.create_task(self.app(scope, watched_receive, timed_send))
        helpers = [asyncio.create_task(watch()), asyncio.create_task(gone.wait())]
        try:
            await asyncio.wait([app_task, helpers[1]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for helper in helpers:
                helper.cancel()
            if not app_task.done():
                app_task.cancel()
                if gone.is_set():
                    log.info("client left; request cancelled", extra={"fields": {
                        "request_id": scope.get("state", {}).get("request_id"),
                        "path": scope.get("path")}})
            await asyncio.wait([app_task])
        if not app_task.cancelled() and app_task.exception() is not None:
            raise app_task.exception()
