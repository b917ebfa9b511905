"""The agents' API with real clients on a real model: tool calls (OpenAI's and Anthropic's
shapes, streamed and not), structured output, logprobs, /v1/completions, the OpenAI Agents
SDK, and bad input. SmolLM2 135M is too small to choose tools well, so the tests name or
require the tool: what they check is that every answer parses, validates and keeps the
agent's cache, which the grammar guarantees whatever the model prefers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import agents
import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import SMOLLM2
from tests.servers import ServerProcess

GREEDY = {"temperature": 0}
TEMPLATES = Path(__file__).parent / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: str = Field(max_length=30)
    unit: str


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    is_capital: bool


def test_parse_returns_a_validated_object(smol_server):
    reply = smol_server.client("structured").chat.completions.parse(
        model=smol_server.model, messages=[{"role": "user", "content": "Describe Paris."}],
        response_format=City, max_tokens=60, **GREEDY)
    city = reply.choices[0].message.parsed
    print(city)
    assert isinstance(city, City) and reply.choices[0].finish_reason == "stop"


def test_a_named_tool_loop_validates_and_keeps_its_cache(smol_server):
    client = smol_server.client("tool-loop")
    messages = list(ASK)
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=smol_server.model, messages=messages,
                                           tools=[WEATHER], tool_choice=named, max_tokens=40,
                                           **GREEDY)
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    WeatherArgs.model_validate_json(call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees"}]
    second = client.chat.completions.create(model=smol_server.model, messages=messages,
                                            tools=[WEATHER], tool_choice="required",
                                            max_tokens=40, **GREEDY)
    for tool_call in second.choices[0].message.tool_calls:
        WeatherArgs.model_validate_json(tool_call.function.arguments)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    messages += [second.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "Sunny"}
                 for c in second.choices[0].message.tool_calls]
    third = client.chat.completions.create(model=smol_server.model, messages=messages,
                                           tools=[WEATHER], tool_choice="none", max_tokens=12,
                                           **GREEDY)
    assert third.choices[0].message.tool_calls is None
    assert isinstance(third.choices[0].message.content, str)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens


def test_a_streamed_tool_call_reassembles_to_the_same_call(smol_server):
    client = smol_server.client()
    kwargs = {"model": smol_server.model, "messages": ASK, "tools": [WEATHER],
              "tool_choice": "required", "max_tokens": 40, **GREEDY}
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        finishes.append(chunk.choices[0].finish_reason)
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert [c for c in finishes if c] == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole]


@pytest.mark.parametrize("model_class", ["OpenAIChatCompletionsModel", "OpenAIResponsesModel"])
def test_the_openai_agents_sdk_runs_a_tool_agent_to_its_end(smol_server, model_class):
    """On chat completions, and on the Responses API (the SDK's default model)."""
    agents.set_tracing_disabled(True)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        called.append(city)
        return f"Sunny in {city}"

    client = openai.AsyncOpenAI(base_url=f"{smol_server.url}/v1", api_key="unused",
                                default_headers={"X-Agent-ID": f"sdk-{model_class}"})
    agent = agents.Agent(
        name="weather", instructions="Use the tool to answer.", tools=[get_weather],
        tool_use_behavior="stop_on_first_tool",
        model=getattr(agents, model_class)(model=smol_server.model, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0,
                                            parallel_tool_calls=False, max_tokens=40))
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?",
                                           max_turns=3))
    assert len(called) == 1 and isinstance(called[0], str)
    assert result.final_output == f"Sunny in {called[0]}"


def test_anthropic_tool_use_then_tool_result(smol_server):
    client = anthropic.Anthropic(base_url=smol_server.url, api_key="unused", max_retries=0,
                                 default_headers={"X-Agent-ID": "anthropic-tools"})
    tools = [{"name": "get_weather", "description": "Current weather in a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    messages = list(ASK)
    # Greedy, as a sampled city name of up to 30 characters can outrun any token limit.
    first = client.messages.create(model=smol_server.model, max_tokens=60, messages=messages,
                                   tools=tools, tool_choice={"type": "any"},
                                   extra_body=GREEDY)
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    WeatherArgs.model_validate(use.input)
    messages += [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                               "content": "Sunny"}]}]
    with client.messages.stream(model=smol_server.model, max_tokens=60, messages=messages,
                                tools=tools, tool_choice={"type": "tool", "name": "get_weather"},
                                extra_body=GREEDY) as stream:
        second = stream.get_final_message()
    assert second.stop_reason == "tool_use"
    WeatherArgs.model_validate(next(b for b in second.content if b.type == "tool_use").input)
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens


def test_logprobs_streamed_and_not(smol_server):
    client = smol_server.client()
    kwargs = {"model": smol_server.model, "messages": [{"role": "user", "content": "Hi"}],
              "max_tokens": 4, "logprobs": True, "top_logprobs": 3, **GREEDY}
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    assert len(whole) == 4 and all(len(t.top_logprobs) == 3 for t in whole)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
               for t in whole)
    assert whole[0].token == whole[0].top_logprobs[0].token  # greedy takes the likeliest
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in whole]


def test_completions_continue_text_and_token_ids_with_an_agents_cache(smol_server):
    url = f"{smol_server.url}/v1/completions"
    headers = {"X-Agent-ID": "completer"}
    first = httpx.post(url, headers=headers, timeout=120, json={
        "prompt": "The capital of France is", "max_tokens": 4, "logprobs": 2, **GREEDY}).json()
    choice = first["choices"][0]
    assert first["object"] == "text_completion" and choice["text"]
    assert len(choice["logprobs"]["tokens"]) == 4 and choice["logprobs"]["text_offset"][0] == 0
    longer = httpx.post(url, headers=headers, timeout=120, json={
        "prompt": "The capital of France is Paris. The capital of Spain is", "max_tokens": 2,
        **GREEDY}).json()
    assert longer["usage"]["prompt_tokens_details"]["cached_tokens"] >= \
        first["usage"]["prompt_tokens"] - 1
    ids = httpx.post(url, timeout=120, json={"prompt": [504, 3575, 282], "max_tokens": 2,
                                             "stream": True, **GREEDY})
    events = [line for line in ids.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == \
        "text_completion"


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function"}]}, "tools.0"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {
        "type": "no-such-type"}}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_nobody", "content": "x"}]},
     "messages"),
    ({"n": 2}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, None),
    ({"logit_bias": {"1": 5}}, None),
    ({"tools": [WEATHER], "stop": "x"}, "stop"),
    ({"functions": [WEATHER["function"]]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_param(smol_server, body, param):
    response = httpx.post(f"{smol_server.url}/v1/chat/completions", timeout=60,
                          json={"messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    print(error["message"])
    if param is not None:
        assert error["param"] == param
    assert smol_server.health()["active_sequences"] == 0


@pytest.fixture(scope="module")
def hermes_server(models_dir, tmp_path_factory):
    """SmolLM2's weights behind a chat template that takes tools and writes Hermes-style
    <tool_call> blocks (as Qwen's and Hermes' templates do): a real model with a native
    tool template, so the template's own format is used instead of the generic one."""
    model = tmp_path_factory.mktemp("hermes") / "smollm2-hermes"
    model.mkdir()
    source = models_dir / SMOLLM2
    for name in ("model.safetensors", "config.json", "tokenizer.json", "import.json"):
        (model / name).symlink_to(source / name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = (TEMPLATES / "hermes_tools.jinja").read_text()
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    server = ServerProcess(model.name, extra_models=json.dumps([str(model)]),
                           max_context_tokens="2048").start()
    yield server
    server.stop()


def test_a_native_tool_template_gets_its_own_format(hermes_server):
    client = hermes_server.client("hermes-agent")
    model = hermes_server.model
    messages = list(ASK)
    first = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=40, **GREEDY)
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    WeatherArgs.model_validate_json(call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}]
    second = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                            tool_choice="none", max_tokens=8, **GREEDY)
    assert second.choices[0].message.tool_calls is None
    assert "<tool_call>" not in second.choices[0].message.content
    # the template renders the call as the model wrote it, so the first turn's prompt is
    # cached but for the last token (where the template joins "assistant" and "\n<tool_call>"
    # into other tokens than the generation prompt's "assistant\n")
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    streamed = [d for chunk in client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=40, stream=True, **GREEDY)
        if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
    assert streamed[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in streamed)) == \
        json.loads(call.function.arguments)
