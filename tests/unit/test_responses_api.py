"""The Responses API in process (the real app over fake models): shapes of replies and
streams, stored responses continued by ``previous_response_id`` on the agent's cache, and
what cannot be honoured refused or withheld."""

from __future__ import annotations

import json

import pytest

from semantic_server.api.responses_routes import ITEMS, _turns

REPLY = "Hello from A."


@pytest.fixture
def client(make_client):
    return make_client()


def _events(response) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
            if line.startswith("data: ")]


def test_text_input_answers_a_message_with_usage(client):
    reply = client.post("/v1/responses", json={"input": "Hi", "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["id"].startswith("resp_") and body["model"] == "fake-a"
    [message] = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text"
    assert message["content"][0]["text"] == REPLY
    usage = body["usage"]
    assert usage["output_tokens"] == len(REPLY)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_previous_response_id_continues_on_the_agents_cache(client):
    first = client.post("/v1/responses", json={"input": "Hi", "instructions": "Be brief."})
    first = first.json()
    again = client.post("/v1/responses", json={
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "More?"}]}],
        "instructions": "Be brief.", "previous_response_id": first["id"]}).json()
    # the whole first turn, its answer included, came from the agent's cache
    assert again["usage"]["input_tokens_details"]["cached_tokens"] == \
        first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert again["previous_response_id"] == first["id"]
    stored = client.get(f"/v1/responses/{again['id']}")
    assert stored.status_code == 200 and stored.json()["output"] == again["output"]


def test_store_false_keeps_no_record_and_unknown_ids_are_404(client):
    reply = client.post("/v1/responses", json={"input": "Hi", "store": False}).json()
    missing = client.get(f"/v1/responses/{reply['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "response_not_found"
    follow = client.post("/v1/responses", json={"input": "x", "previous_response_id": "nope"})
    assert follow.status_code == 404


def test_delete_forgets_a_stored_response(client):
    reply = client.post("/v1/responses", json={"input": "Hi"}).json()
    deleted = client.delete(f"/v1/responses/{reply['id']}")
    assert deleted.json() == {"id": reply["id"], "object": "response.deleted", "deleted": True}
    assert client.get(f"/v1/responses/{reply['id']}").status_code == 404


def test_stream_sends_the_full_event_sequence(client):
    with client.stream("POST", "/v1/responses", json={"input": "Hi", "stream": True}) as r:
        assert r.status_code == 200
        events = _events(r)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == REPLY
    done = events[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == REPLY and done["usage"]["output_tokens"]
    assert client.get(f"/v1/responses/{done['id']}").json()["output"] == done["output"]


def test_prompt_cache_key_names_the_agent(client):
    body = {"input": "Hi", "prompt_cache_key": "session-1", "store": False}
    first = client.post("/v1/responses", json=body).json()
    again = client.post("/v1/responses", json={**body, "input": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": REPLY}]},
        {"role": "user", "content": "More?"}]}).json()
    assert again["usage"]["input_tokens_details"]["cached_tokens"] >= \
        first["usage"]["input_tokens"]


def test_hosted_tools_are_withheld_and_named(client):
    reply = client.post("/v1/responses", json={"input": "Hi", "tools": [
        {"type": "web_search"}, {"type": "namespace", "name": "mcp", "description": "",
                                 "tools": [{"type": "custom", "name": "patch"}]}]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-tools-withheld"] == "web_search,mcp.patch"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "truncation": "auto"}, "truncation"),
    ({"input": "Hi", "include": ["message.output_text.logprobs"]}, "include"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "x"}]}, "input"),
    ({"input": "Hi", "tool_choice": "required"}, "tool_choice"),
])
def test_what_cannot_be_honoured_is_a_400(client, body, param):
    reply = client.post("/v1/responses", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "")


def test_a_cut_call_echoed_back_is_rendered_not_refused():
    """Codex resends the whole history, a call that max_output_tokens cut short included
    (arguments that are not JSON): OpenAI's API takes it, and so does this one."""
    items = ITEMS.validate_python([
        {"role": "user", "content": "Run it."},
        {"type": "function_call", "call_id": "c1", "name": "exec", "arguments": '{"cmd":"ca'},
        {"type": "function_call_output", "call_id": "c1", "output": "cut"}])
    turns = _turns("Be brief.", items)
    assert turns[2].calls[0].arguments == {"_unparsed": '{"cmd":"ca'}
    assert turns[3].role == "tool" and turns[3].name == "exec"


def test_explicit_nulls_mean_the_defaults_and_odd_tool_names_stay_ascii(client):
    reply = client.post("/v1/responses", json={
        "input": "Hi", "temperature": None, "top_p": None, "stream": None, "store": None,
        "parallel_tool_calls": None, "tools": [{"type": "web_search", "name": "r\u00e9seau"}]})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-tools-withheld"] == "r%C3%A9seau"


def test_an_answer_cut_by_the_limit_is_an_incomplete_item(make_client):
    body = make_client(max_tokens_limit=4).post("/v1/responses", json={"input": "Hi"}).json()
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][-1]["status"] == "incomplete"


def test_a_result_without_a_call_id_is_rendered_by_its_name():
    """Codex resends results of its own with no call_id, named by name and namespace."""
    items = ITEMS.validate_python([
        {"role": "user", "content": "Go."},
        {"type": "function_call_output", "name": "goal", "namespace": "agent", "output": "x"}])
    turn = _turns(None, items)[1]
    assert (turn.role, turn.name, turn.content) == ("tool", "agent.goal", "x")
