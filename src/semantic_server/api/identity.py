"""Which agent a request belongs to, from what each kind of client sends.

Our own header, ``X-Agent-ID``, is a contract: an id outside the safe alphabet is a 400.
Everything else is a client's own metadata, sent for its own reasons, and never a 400: a
value outside the alphabet (a JSON ``metadata.user_id``, a long session string) is hashed
into a stable id instead, so the same session always finds the same cache.

In order, the first one present names the agent:

- ``X-Agent-ID``;
- ``X-Session-ID`` (opencode, the seed system's clients), ``X-Claude-Code-Session-Id``
  (Claude Code), ``session-id`` (Codex CLI);
- the body's ``session_id``, ``prompt_cache_key`` (Responses), the session inside
  Anthropic's ``metadata.user_id`` (Claude Code sends a JSON object as a string), ``user``.

A coding agent sends its main loop, its sub-agents and small side requests (a title, a
summary) under one session id, each with its own system prompt. Their histories are
different conversations: under one agent, each would cut the others' cache back to the
short prefix they share. So an id that came from a session (not ``X-Agent-ID``) is
qualified by the request's *family*, a short digest of its system prompt and tool names:
the main loop keeps its cache whatever side requests come between its turns, and a new
family still starts warm from the prefix its siblings hold (the store seeds new agents).

With API keys, the id is namespaced by the key's tenant ("<tenant>/<agent>"; a client's
own ids cannot contain "/"), so tenants never share an agent.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from semantic_server.api.request_id import SAFE_ID
from semantic_server.errors import InvalidRequest

SESSION_HEADERS = ("x-session-id", "x-claude-code-session-id", "session-id")
BODY_FIELDS = ("session_id", "prompt_cache_key")
# Older Claude Code versions: "user_<device>_account_<uuid>_session_<uuid>".
LEGACY_SESSION = re.compile(r"_session_([A-Za-z0-9-]{8,64})$")


def tenant_of(request: Request) -> str | None:
    """The request's tenant: the name of its API key, when API keys are configured."""
    return getattr(request.state, "tenant", None)


def stable_id(value: str) -> str:
    """A client's value as an agent id: itself when it is one, else a stable digest."""
    if SAFE_ID.fullmatch(value):
        return value
    return "h." + hashlib.blake2b(value.encode("utf-8", "surrogatepass"),
                                  digest_size=16).hexdigest()


def family(system: str, tool_names: Iterable[str]) -> str:
    """The digest that tells a session's conversations apart (see the module's doc)."""
    text = json.dumps([system, sorted(tool_names)], ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()


def session_of_user_id(user_id: Any) -> str | None:
    """The session inside Anthropic's ``metadata.user_id``: a JSON object's ``session_id``,
    the tail of the older ``..._session_<uuid>`` form, or the whole value."""
    if not isinstance(user_id, str) or not user_id:
        return None
    try:
        parsed = json.loads(user_id)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict):
        session = parsed.get("session_id")
        return session if isinstance(session, str) and session else user_id
    match = LEGACY_SESSION.search(user_id)
    return match[1] if match else user_id


def _session(request: Request, body: dict[str, Any], user_id: Any) -> str | None:
    """The first session-like value the client sent, or None."""
    values: list[Any] = [request.headers.get(name) for name in SESSION_HEADERS]
    values += [body.get(name) for name in BODY_FIELDS]
    values.append(session_of_user_id(user_id))
    return next((v for v in values if isinstance(v, str) and v), None)


def agent_id_of(request: Request, body: dict[str, Any], *, user_id: Any = None,
                family_of: str | None = None) -> str | None:
    """The request's agent id (None: anonymous). ``user_id`` is Anthropic's
    ``metadata.user_id``; ``family_of`` the request's family digest, which qualifies an id
    taken from a session."""
    explicit = request.headers.get("x-agent-id")
    if explicit is not None:
        if not SAFE_ID.fullmatch(explicit):
            raise InvalidRequest("an agent id is 1-128 characters of A-Z a-z 0-9 . _ : @ -",
                                 param="agent_id", code="invalid_agent_id")
        agent = explicit
    elif (session := _session(request, body, user_id)) is not None:
        agent = stable_id(session)
        if family_of:
            agent = f"{agent}:{family_of}"
    elif isinstance(user := body.get("user"), str) and user:
        agent = stable_id(user)
    else:
        return None
    tenant = tenant_of(request)
    return f"{tenant}/{agent}" if tenant else agent
