"""The Responses API and Claude Code's Messages fields with real clients on a real model:
the ``openai`` client's ``responses.create`` / ``responses.stream`` and
``previous_response_id`` (across a restart and a swap round trip, continuing on the
agent's cache), and the
``anthropic`` client with ``thinking``, ``cache_control`` and ``count_tokens``. SmolLM2 is
too small to choose tools well, so tool tests require the tool and forbid parallel calls:
what they check is that the answer parses and the cache carries over."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.conftest import SMOLLM2
from tests.e2e.helpers import KEY, swap
from tests.servers import ServerProcess

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "maxLength": 20}},
               "required": ["city"], "additionalProperties": False}}
BRIEF = "You answer in one short sentence."


@pytest.fixture(scope="module")
def state_server(models_dir, twin, tmp_path_factory):
    """A server whose stored responses and caches outlive it (its cache folder is kept for
    a restart), with SmolLM2's twin to swap to."""
    cache_dir = tmp_path_factory.mktemp("responses-caches")
    server = ServerProcess(SMOLLM2, admin_key=KEY, cache_dir=str(cache_dir),
                           extra_models=json.dumps([str(twin)])).start()
    server.twin = twin.name
    yield server
    server.stop()


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=300)


def _ask(client: openai.OpenAI, text: str, **extra):
    return client.responses.create(model=SMOLLM2, instructions=BRIEF, input=text,
                                   temperature=0, max_output_tokens=40, **extra)


def test_previous_response_id_continues_on_the_cache_across_restart_and_swap(state_server):
    client = _client(state_server)
    first = _ask(client, "What is the capital of France?")
    assert first.status == "completed" and "Paris" in first.output_text
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = _ask(client, "And of Italy?", previous_response_id=first.id)
    held = first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= held - 1

    state_server.stop()  # a restart: the cache is written to disk, the record stays
    state_server.start()
    third = _ask(client, "And of Spain?", previous_response_id=second.id)
    held = second.usage.input_tokens + second.usage.output_tokens
    assert third.usage.input_tokens_details.cached_tokens >= held - 1

    assert swap(state_server, state_server.twin).json()["status"] == "success"
    assert swap(state_server, SMOLLM2).json()["status"] == "success"
    fourth = _ask(client, "And of Germany?", previous_response_id=third.id)
    held = third.usage.input_tokens + third.usage.output_tokens
    assert fourth.usage.input_tokens_details.cached_tokens >= held - 1


def test_two_branches_of_one_response_share_its_prefix(state_server):
    client = _client(state_server)
    root = _ask(client, "Name a colour.")
    left = _ask(client, "Another one?", previous_response_id=root.id)
    right = _ask(client, "Why that one?", previous_response_id=root.id)
    held = root.usage.input_tokens + root.usage.output_tokens
    for branch in (left, right):
        assert branch.usage.input_tokens_details.cached_tokens >= held - 1
    client.responses.delete(root.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(root.id)


def test_stream_and_a_function_call_round_trip(smol_server):
    client = _client(smol_server)
    with client.responses.stream(model=SMOLLM2, input="Weather in Paris?", tools=[WEATHER],
                                 tool_choice="required", parallel_tool_calls=False,
                                 temperature=0, max_output_tokens=40) as stream:
        kinds = [event.type for event in stream]
        called = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    [call] = called.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city"}
    answer = client.responses.create(
        model=SMOLLM2, previous_response_id=called.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}],
        temperature=0, max_output_tokens=30)
    assert answer.output[0].type == "message"
    assert answer.usage.input_tokens_details.cached_tokens >= called.usage.input_tokens


def test_anthropic_client_with_thinking_cache_control_and_count_tokens(smol_server):
    client = anthropic.Anthropic(base_url=smol_server.url, api_key="unused", max_retries=0,
                                 timeout=300)
    system = [{"type": "text", "text": BRIEF, "cache_control": {"type": "ephemeral"}}]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    session = {"X-Claude-Code-Session-Id": "e2e-session-1"}
    counted = client.messages.count_tokens(model=SMOLLM2, system=system, messages=messages)
    first = client.messages.create(model=SMOLLM2, max_tokens=40,
                                   system=system, messages=messages,
                                   thinking={"type": "enabled", "budget_tokens": 2048},
                                   extra_headers=session, extra_body={"temperature": 0})
    usage = first.usage
    assert usage.cache_creation_input_tokens + usage.cache_read_input_tokens == \
        counted.input_tokens and usage.input_tokens == 0
    messages += [{"role": "assistant", "content": first.content},
                 {"role": "user", "content": "And of Italy?"}]
    with client.messages.stream(model=SMOLLM2, max_tokens=40, system=system,
                                messages=messages, thinking={"type": "adaptive"},
                                extra_headers=session, extra_body={"temperature": 0}) as s:
        again = s.get_final_message()
    assert again.usage.cache_read_input_tokens >= counted.input_tokens
