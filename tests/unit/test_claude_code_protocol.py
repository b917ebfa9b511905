"""Claude Code's requests as it sends them (Messages API, in process over fake models):
system turns inside ``messages``, ``thinking``, ``context_management``, ``output_config``,
``cache_control``, server and deferred tools, ``count_tokens``, its session identity and
its 32,000-token ``max_tokens``. Shapes only: no agent's own text is used."""

from __future__ import annotations

import json

import pytest

from semantic_server.api.anthropic_routes import _turns
from semantic_server.api.identity import session_of_user_id, stable_id
from semantic_server.api.schemas import MessagesRequest

REPLY = "Hello from A."
SESSION = "0b7c3c4e-5a55-4c4e-9a1b-6d1f0e2a9c11"
TOOL = {"name": "Read", "description": "Reads a file.", "input_schema": {
    "type": "object", "properties": {"file_path": {"type": "string"}},
    "required": ["file_path"]}}


def claude_code_body(**extra):
    """A request shaped as Claude Code 2.1 sends it (texts are ours)."""
    return {
        "model": "fake-a", "max_tokens": 32000, "stream": False,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; "
                                            "cc_entrypoint=sdk-cli;"},
                   {"type": "text", "text": "You are a test agent.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Working folder: /tmp/x"}],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": json.dumps({"device_id": "d" * 64, "account_uuid": "",
                                            "session_id": SESSION})},
        **extra}


@pytest.fixture
def client(make_client):
    return make_client()


def test_claude_code_request_is_answered_and_capped_by_the_context(client):
    reply = client.post("/v1/messages?beta=true", json=claude_code_body(), headers={
        "anthropic-beta": "claude-code-20250219,context-management-2025-06-27",
        "X-Claude-Code-Session-Id": SESSION})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["content"] == [{"type": "text", "text": REPLY}]
    assert body["context_management"] == {"applied_edits": []}
    usage = body["usage"]
    # breakpoints: the uncached prompt is written to the agent's cache
    assert usage["input_tokens"] == 0 and usage["cache_creation_input_tokens"] > 0


def test_system_turns_stand_where_they_are():
    chat = MessagesRequest.model_validate(claude_code_body())
    assert [(turn.role, turn.content) for turn in _turns(chat)] == [
        ("system", "You are a test agent."), ("user", "What is 2+2?"),
        ("system", "Working folder: /tmp/x")]


def test_a_billing_line_that_changes_does_not_cost_the_cache(client):
    headers = {"X-Agent-ID": "cc"}
    first = client.post("/v1/messages", json=claude_code_body(), headers=headers).json()
    body = claude_code_body()
    body["system"][0]["text"] += " cch=12345;"
    again = client.post("/v1/messages", json=body, headers=headers).json()
    # the same prompt: all of it cached but its last token, which is prefilled to answer
    assert again["usage"]["cache_read_input_tokens"] == \
        first["usage"]["cache_creation_input_tokens"] - 1


def test_the_session_names_the_agent_and_side_requests_do_not_cut_its_cache(client):
    headers = {"X-Claude-Code-Session-Id": SESSION}
    first = client.post("/v1/messages", json=claude_code_body(), headers=headers).json()
    side = claude_code_body(system="Write a title.", messages=[
        {"role": "user", "content": "What is 2+2?"}])
    client.post("/v1/messages", json=side, headers=headers)
    body = claude_code_body()
    body["messages"] += [{"role": "assistant", "content": REPLY},
                         {"role": "user", "content": "And 3+3?"}]
    again = client.post("/v1/messages", json=body, headers=headers).json()
    prompt = first["usage"]["cache_creation_input_tokens"] + \
        first["usage"]["cache_read_input_tokens"]
    assert again["usage"]["cache_read_input_tokens"] >= prompt


def test_metadata_user_id_is_never_a_400_and_names_a_session():
    assert session_of_user_id(json.dumps({"session_id": SESSION})) == SESSION
    assert session_of_user_id(f"user_{'a' * 64}_account__session_{SESSION}") == SESSION
    assert stable_id("not a safe id!") == stable_id("not a safe id!")
    assert stable_id("not a safe id!").startswith("h.") and stable_id("ok-id") == "ok-id"


def test_server_and_deferred_tools_are_withheld_and_named(client):
    reply = client.post("/v1/messages", json=claude_code_body(tools=[
        {"type": "web_search_20250305", "name": "web_search"},
        {**TOOL, "name": "mcp__x__y", "defer_loading": True}], output_config=None))
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-tools-withheld"] == "web_search,mcp__x__y"


def test_count_tokens_counts_what_a_generation_would_prefill(client):
    counted = client.post("/v1/messages/count_tokens", json={
        k: v for k, v in claude_code_body().items() if k != "max_tokens"})
    assert counted.status_code == 200, counted.text
    reply = client.post("/v1/messages", json=claude_code_body()).json()
    assert counted.json()["input_tokens"] == reply["usage"]["cache_creation_input_tokens"]


def test_clear_tool_uses_clears_the_oldest_results_past_its_trigger(client):
    messages = [{"role": "user", "content": "Read them."}]
    for i in range(4):
        messages += [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}",
                                               "name": "Read", "input": {"file_path": "f"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                                          "content": "long file text " * 20}]}]
    edit = {"type": "clear_tool_uses_20250919", "trigger": {"type": "input_tokens",
                                                             "value": 100},
            "keep": {"type": "tool_uses", "value": 1}}
    count = client.post("/v1/messages/count_tokens", json={
        "messages": messages, "tools": [TOOL], "context_management": {"edits": [edit]}})
    plain = client.post("/v1/messages/count_tokens", json={
        "messages": messages, "tools": [TOOL]})
    assert count.json()["input_tokens"] < plain.json()["input_tokens"]


@pytest.mark.parametrize(("field", "value"), [
    ("context_management", {"edits": [{"type": "clear_everything_20990101"}]}),
    ("thinking", {"type": "enabled"}),
    ("output_config", {"effort": "extreme"}),
    ("top_k", 5),
])
def test_what_cannot_be_honoured_is_a_400(client, field, value):
    reply = client.post("/v1/messages", json=claude_code_body(**{field: value}))
    assert reply.status_code == 400, reply.text
    assert reply.json()["type"] == "error" and field in reply.json()["error"]["message"]


def test_max_tokens_over_the_limit_is_served_up_to_it(make_client):
    client = make_client(max_tokens_limit=4)
    reply = client.post("/v1/messages", json=claude_code_body()).json()
    assert reply["stop_reason"] == "max_tokens" and reply["usage"]["output_tokens"] == 4
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32000}).json()
    assert chat["choices"][0]["finish_reason"] == "length"


def test_a_deeply_nested_user_id_is_not_a_500(client):
    body = claude_code_body(metadata={"user_id": "[" * 100_000})
    assert client.post("/v1/messages", json=body).status_code == 200


def test_anthropic_model_names_run_on_the_serving_model(client):
    """Claude Code names Anthropic's own models for some side requests: they run on the
    serving model (and say so); any other unknown model is still a 404."""
    reply = client.post("/v1/messages", json=claude_code_body(model="claude-haiku-4-5"))
    assert reply.status_code == 200 and reply.json()["model"] == "fake-a"
    other = client.post("/v1/messages", json=claude_code_body(model="gpt-nope"))
    assert other.status_code == 404
