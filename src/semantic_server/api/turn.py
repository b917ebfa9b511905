"""One turn over HTTP, as every generating API (chat, completions, Messages, Responses)
takes it: the body read within its size limit, max_tokens bounded, the generation's
admission awaited, and the generation relayed to the client.

Each API only shapes its own JSON and events around these steps, so a rule (which agent
ids are valid, what a held request may run on, what a failure after the first byte looks
like) is written once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request

from semantic_server.engine.constraints import json_schema_grammar
from semantic_server.engine.service import Admitted, Grammar, TokenLogprob
from semantic_server.errors import InvalidRequest, PayloadTooLarge
from semantic_server.request_outcome import Outcome


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def capped_max_tokens(request: Request, requested: int | None) -> int:
    """The request's max_tokens (or the server's default), as an upper bound: above
    ``SEMANTIC_MAX_TOKENS_LIMIT`` it is served up to the limit, as the context's end also
    bounds it, and ends with the API's own length reason. Coding agents ask for 32,000
    tokens whatever the model: refusing that would refuse them all."""
    settings = request.app.state.server.settings
    return min(requested or settings.default_max_tokens, settings.max_tokens_limit)


ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
"""The schema of a ``json_object`` answer: any object (the grammar closes every object a
schema does not explicitly leave open)."""


def schema_grammar(schema: dict[str, Any], param: str) -> Grammar:
    """The grammar of answers that match a JSON schema; one it cannot be made from is a
    400 naming ``param``."""
    try:
        return Grammar(json_schema_grammar(schema), param)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{param} cannot be used: {exc}", param=param,
                             code="invalid_schema") from exc


WITHHELD_HEADER = "X-Tools-Withheld"


def withheld_header(names: list[str]) -> dict[str, str]:
    """The header that names the tools a request declared but the model was not offered
    (hosted and server tools cannot run here: README, "Coding agents"); a name's characters
    outside ASCII letters, digits and ``._:-`` are percent-encoded (a header is ASCII)."""
    if not names:
        return {}
    return {WITHHELD_HEADER: ",".join(quote(name, safe="._:-") for name in names)}


def openai_usage(outcome: Outcome) -> dict[str, Any]:
    """The usage block of OpenAI's APIs (chat and completions)."""
    return {"prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens}}


async def wait_admitted(items: AsyncIterator[Admitted | str | Outcome]) -> Admitted:
    """Wait until the generation is admitted: refusals (unknown model, busy, too long) raise
    here, before any byte is sent, so they keep their HTTP status even for streams."""
    first = await anext(items)
    if not isinstance(first, Admitted):
        raise AssertionError("a generation starts with Admitted")
    return first


async def relay(items: AsyncIterator[Admitted | str | TokenLogprob | Outcome],
                ) -> AsyncIterator[str | TokenLogprob | Outcome | Exception]:
    """Text deltas (and log-probabilities), then the Outcome, or the error that ended the
    generation instead.

    A stream has sent its status and first events by the time a generation can fail, so
    the error is handed to the caller to become an error event, not raised into Starlette
    (which could only cut the connection and log a traceback). Closing the relay closes the
    generation, which cancels its job: use it under ``aclosing`` so a client that goes away
    frees its batch slot at once.
    """
    try:
        while not isinstance(item := await anext(items), Outcome):
            yield item
    except Exception as exc:  # every failure becomes the stream's last event
        yield exc
        return
    finally:
        await items.aclose()
    yield item


@dataclass
class Collected:
    """A whole non-streamed generation."""

    text: str
    outcome: Outcome
    logprobs: list[TokenLogprob]


async def collect(items: AsyncIterator[Admitted | str | TokenLogprob | Outcome]) -> Collected:
    """The whole text, log-probabilities and outcome of a non-streamed request (errors
    raise: no byte has been sent yet, so they keep their HTTP status)."""
    text: list[str] = []
    logprobs: list[TokenLogprob] = []
    async with aclosing(relay(items)) as relayed:
        async for item in relayed:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Outcome):
                return Collected("".join(text), item, logprobs)
            if isinstance(item, TokenLogprob):
                logprobs.append(item)
            else:
                text.append(item)
    raise AssertionError("relay ends with an outcome or an error")
