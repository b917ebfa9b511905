"""The generic tool format: what the answer's schema allows for each tool choice, how a
conversation renders back to the text the model wrote, and the streaming parser that turns
an answer into text or tool-call deltas however it is cut into pieces."""

from __future__ import annotations

import json

import pytest

from semantic_server.api import tools as t
from semantic_server.errors import InvalidRequest

WEATHER = t.Tool("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = t.Tool("get_time", "Time in a zone", {"type": "object"})


def _names(schema: dict) -> list[str]:
    calls = next(s for s in schema.get("anyOf", [schema]) if "tool_calls" in s["properties"])
    return [option["properties"]["name"]["const"]
            for option in calls["properties"]["tool_calls"]["items"]["anyOf"]]


def test_the_answer_schema_follows_the_tool_choice():
    auto = t.output_schema([WEATHER, TIME], t.ToolChoice())
    assert len(auto["anyOf"]) == 2 and _names(auto) == ["get_weather", "get_time"]
    required = t.output_schema([WEATHER, TIME], t.ToolChoice(t.ChoiceMode.REQUIRED))
    assert "anyOf" not in required and required["properties"]["tool_calls"]["minItems"] == 1
    named = t.output_schema([WEATHER, TIME], t.ToolChoice(t.ChoiceMode.NAMED, "get_time"))
    assert _names(named) == ["get_time"]
    assert named["properties"]["tool_calls"]["maxItems"] == 1
    single = t.output_schema([WEATHER], t.ToolChoice(parallel=False))
    assert single["anyOf"][0]["properties"]["tool_calls"]["maxItems"] == 1
    none = t.output_schema([WEATHER], t.ToolChoice(t.ChoiceMode.NONE))
    assert none["required"] == ["response"]


@pytest.mark.parametrize(("tools", "choice"), [
    ([WEATHER, WEATHER], t.ToolChoice()),
    ([WEATHER], t.ToolChoice(t.ChoiceMode.NAMED, "get_time")),
    ([], t.ToolChoice(t.ChoiceMode.REQUIRED)),
])
def test_what_cannot_be_honoured_is_refused(tools, choice):
    with pytest.raises(InvalidRequest):
        t.check_tools(tools, choice, "tools")


def test_history_renders_to_what_the_model_wrote():
    written = '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}'
    answer = t.parse_answer(written)
    assert answer.complete and [(c.name, c.arguments) for c in answer.calls] == [
        ("get_weather", {"city": "Paris"})]
    assert t.calls_text(answer.calls) == written
    reply = '{"response":"Sunny, \\"warm\\" and dry"}'
    assert t.reply_text(t.parse_answer(reply).text) == reply
    cut = t.parse_answer('{"response":"Sunny an')  # max_tokens reached: the text so far
    assert not cut.complete and cut.text == "Sunny an" and cut.calls == []


def test_tools_join_the_system_turn():
    with_system = t.with_tools([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}], [WEATHER])
    assert with_system[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert json.loads(with_system[0]["content"].splitlines()[3])["name"] == "get_weather"
    without = t.with_tools([{"role": "user", "content": "hi"}], [WEATHER])
    assert without[0]["role"] == "system" and len(without) == 2


ANSWERS = [
    json.dumps({"response": 'He said "hi"\n\\ \u00e9 \U0001F600'}, separators=(",", ":")),
    json.dumps({"response": "caf\u00e9 \U0001F600"}, separators=(",", ":"), ensure_ascii=False),
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Pa}r\\"is","n":[1,{"a":2}]}},'
    '{"name":"get_time","arguments":{}}]}',
]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("step", [1, 2, 3, 5, 1000])
def test_the_stream_parser_gives_the_same_answer_however_it_is_cut(answer, step):
    stream = t.OutputStream()
    events = [e for i in range(0, len(answer), step) for e in stream.feed(answer[i:i + step])]
    expected = json.loads(answer)
    if "response" in expected:
        assert "".join(e.text for e in events) == expected["response"]
        return
    starts = [e for e in events if isinstance(e, t.CallStart)]
    assert [e.name for e in starts] == [c["name"] for c in expected["tool_calls"]]
    arguments: dict[int, str] = {}
    for event in events:
        if isinstance(event, t.ArgumentsDelta):
            arguments[event.index] = arguments.get(event.index, "") + event.json
    assert [json.loads(arguments[i]) for i in range(len(starts))] == [
        c["arguments"] for c in expected["tool_calls"]]


def test_lone_surrogates_become_replacement_characters():
    answer = t.parse_answer('{"response":"a\\ud83db"}')
    assert answer.text == "a\ufffdb"
    stream = t.OutputStream()
    assert "".join(e.text for e in stream.feed('{"response":"x\\ud83dabcdefgh"}')) == \
        "x\ufffdabcdefgh"
