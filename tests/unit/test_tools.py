"""The generic tool format: what the answer's schema allows for each tool choice, how a
conversation renders back to the text the model wrote, and the streaming parser that turns
an answer into text or tool-call deltas however it is cut into pieces. Then what every
grammar allows (over a vocabulary of bytes): answers that end, closed objects and bounded
numbers; and an answer max_tokens cuts short, the same streamed and not in every API."""

from __future__ import annotations

import json

import llguidance
import pytest

from semantic_server.api import tools as t
from semantic_server.api.hermes_tools import HermesFormat
from semantic_server.api.turn import ANY_OBJECT, schema_grammar
from semantic_server.engine import service
from semantic_server.engine.constraints import json_schema_grammar
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


# ---- what the grammar allows: answers that always end -------------------------------------
class _ByteVocabulary:
    """A vocabulary of the 256 bytes and an end token, as llguidance takes one: enough to
    ask a grammar which texts it allows, without a model."""

    eos_token_id = 256
    bos_token_id = None
    tokens = (*(bytes([i]) for i in range(256)), b"<eos>")
    special_token_ids = (256,)
    is_tokenizer_wrapper = True

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


BYTES = llguidance.LLTokenizer(_ByteVocabulary())


def _allows(grammar: str, text: str) -> bool:
    """Whether ``text`` is a whole answer the grammar allows."""
    matcher = llguidance.LLMatcher(BYTES, grammar)
    tokens = list(text.encode())
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


FORCED = t.ToolChoice(t.ChoiceMode.NAMED, "get_weather")
GENERIC_CALL = '{"tool_calls":[{"name":"get_weather","arguments":%s}]}'
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>'


@pytest.mark.parametrize(("fmt", "call", "sep"), [
    (t.GenericFormat(), GENERIC_CALL, (",", ":")), (HermesFormat(), HERMES_CALL, (", ", ": "))])
def test_a_forced_call_has_only_the_declared_properties_and_no_free_whitespace(fmt, call, sep):
    # LangChain's default tool schema: no additionalProperties, so JSON Schema allows more
    # properties; a model adding them forever never finished (issue 30, item 12).
    grammar = fmt.grammar([WEATHER], FORCED)
    item, key = sep
    assert _allows(grammar, call % f'{{"city"{key}"Paris"}}')
    assert not _allows(grammar, call % f'{{"city"{key}"Paris"{item}"country"{key}"FR"}}')
    assert not _allows(grammar, call % f'{{ "city"{key}"Paris"}}')
    assert not _allows(grammar, call % f'{{"city"{key}  "Paris"}}')
    # nested objects are closed too; an object that asks for more properties gets them
    nested = t.Tool("get_weather", "", {"type": "object", "properties": {
        "where": {"type": "object", "properties": {"city": {"type": "string"}}},
        "extra": {"type": "object", "additionalProperties": True},
        "tags": {"type": "object", "additionalProperties": {"type": "string"}}}})
    grammar = fmt.grammar([nested], FORCED)
    value = {"where": {"city": "Oslo"}, "extra": {"any": "thing"}, "tags": {"a": "b"}}
    assert _allows(grammar, call % json.dumps(value, separators=sep))
    value["where"]["zip"] = "0150"
    assert not _allows(grammar, call % json.dumps(value, separators=sep))
    # a tool without parameters takes {} and nothing else
    assert _allows(fmt.grammar([TIME], t.ToolChoice(t.ChoiceMode.NAMED, "get_time")),
                   call.replace("get_weather", "get_time") % "{}")
    assert not _allows(fmt.grammar([TIME], t.ToolChoice(t.ChoiceMode.NAMED, "get_time")),
                       call.replace("get_weather", "get_time") % f'{{"zone"{key}"UTC"}}')


def test_a_json_schema_answer_is_closed_the_same_way_and_json_object_stays_open():
    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    grammar = schema_grammar(city, "response_format").text
    assert _allows(grammar, '{"name":"Oslo"}')
    assert not _allows(grammar, '{"name":"Oslo","country":"NO"}')
    assert not _allows(grammar, '{"name": "Oslo"}')
    assert _allows(schema_grammar(ANY_OBJECT, "response_format").text, '{"a":1,"b":[true]}')


NUMBERS = [
    ({"type": "number"}, ["0", "-0.5", "3.0", "12345678901234567", "1234567.1234567891",
                          "0.0000000001"],
     ["123456789012345678", "1111111111111111111111", "12345678.1234567891",
      "0.00000000001", "1.23456789012", "1e5", "1E-7"]),
    ({"type": "integer"}, ["0", "-7", "1000000000000000000", "-1000000000000000000"],
     ["1000000000000000001", "99999999999999999999", "1.5"]),
    ({"type": ["number", "null"]}, ["null", "2.5"], ["1111111111111111111111"]),
    ({"type": "number", "minimum": 5}, ["5", "7.25", "12345678901234567"],
     ["4.5", "123456789012345678", "7.12345678901234567"]),
    ({"type": "integer", "maximum": 10}, ["10", "-1000000000000000000"],
     ["11", "-10000000000000000000"]),
]


@pytest.mark.parametrize(("number", "allowed", "refused"), NUMBERS)
def test_numbers_end_within_what_a_float64_or_an_int64_holds(number, allowed, refused):
    # with_structured_output(City, strict=True) ran to the length limit inside
    # "population_millions": 1111111111... (issue 30, item 13)
    schema = {"type": "object", "properties": {"n": number}, "required": ["n"]}
    grammar = json_schema_grammar(schema)
    assert [n for n in allowed if not _allows(grammar, f'{{"n":{n}}}')] == []
    assert [n for n in refused if _allows(grammar, f'{{"n":{n}}}')] == []
    hermes = HermesFormat().grammar([t.Tool("get_weather", "", schema)], FORCED)
    assert _allows(hermes, HERMES_CALL % f'{{"n": {allowed[-1]}}}')
    assert not _allows(hermes, HERMES_CALL % f'{{"n": {refused[0]}}}')


# ---- an answer cut short: the same streamed and not ----------------------------------------
CUT = [
    # max_tokens inside the first call's arguments: no call, no text
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Par',
    # inside the second call: the first one, whole
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_ti',
    '{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}},{"name":"get_time",'
    '"arguments":{"zo',
]


@pytest.mark.parametrize("cut", CUT)
@pytest.mark.parametrize("step", [1, 4, 1000])
def test_a_cut_answer_streams_only_what_parsing_it_whole_returns(cut, step):
    stream = t.OutputStream()
    events = [e for i in range(0, len(cut), step) for e in stream.feed(cut[i:i + step])]
    streamed = [(e.name, "".join(a.json for a in events
                                 if isinstance(a, t.ArgumentsDelta) and a.index == e.index))
                for e in events if isinstance(e, t.CallStart)]
    whole = t.parse_answer(cut)
    assert not whole.complete and not any(isinstance(e, t.TextDelta) for e in events)
    assert streamed == [(c.name, t.compact(c.arguments)) for c in whole.calls]
    assert [c.name for c in whole.calls] == (["get_weather"] if "}}," in cut else [])
    assert whole.text == ("" if not whole.calls else None)


def _data(response) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
            if line.startswith("data: {")]


def _chat(client, body: dict) -> tuple[tuple, tuple]:
    """A chat answer as (finish reason, text, calls), whole and reassembled from its stream."""
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    message = choice["message"]
    whole = (choice["finish_reason"], message["content"] or "", [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls")
        or []])
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
        chunks = [c["choices"][0] for c in _data(reply) if c["choices"]]
    calls: dict[int, list[str]] = {}
    for delta in (c["delta"] for c in chunks):
        for call in delta.get("tool_calls") or []:
            named = calls.setdefault(call["index"], ["", ""])
            named[0] += call["function"].get("name") or ""
            named[1] += call["function"].get("arguments") or ""
    streamed = (next(c["finish_reason"] for c in chunks if c["finish_reason"]),
                "".join(c["delta"].get("content") or "" for c in chunks),
                [tuple(c) for c in calls.values()])
    return whole, streamed


def _messages(client, body: dict) -> tuple[tuple, tuple]:
    """A Messages answer as (stop reason, content without ids), whole and from its stream."""
    def plain(blocks: list[dict]) -> list[dict]:
        return [{k: v for k, v in b.items() if k != "id"} for b in blocks]

    reply = client.post("/v1/messages", json=body).json()
    with client.stream("POST", "/v1/messages", json={**body, "stream": True}) as stream:
        events = _data(stream)
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    for event in events:
        if event["type"] == "content_block_start":
            blocks.append(dict(event["content_block"]))
        elif event["type"] == "content_block_delta" and "text" in event["delta"]:
            blocks[event["index"]]["text"] += event["delta"]["text"]
        elif event["type"] == "content_block_delta":
            partial[event["index"]] = partial.get(event["index"], "") + \
                event["delta"]["partial_json"]
    for index, text in partial.items():
        blocks[index]["input"] = json.loads(text)
    stop = next(e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta")
    return (reply["stop_reason"], plain(reply["content"])), (stop, plain(blocks))


def _responses(client, body: dict) -> tuple[tuple, tuple]:
    """A response as (status, output items without ids), whole and as its stream ended."""
    def plain(response: dict) -> tuple:
        return response["status"], [{k: v for k, v in item.items() if k not in (
            "id", "call_id")} for item in response["output"]]

    reply = client.post("/v1/responses", json=body).json()
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
        last = _data(stream)[-1]
    return plain(reply), plain(last["response"])


@pytest.mark.parametrize("cut", CUT)
def test_a_cut_answer_is_the_same_streamed_and_not_in_every_api(make_client, fake_models,
                                                                monkeypatch, cut):
    # The fake model writes the answer and runs into max_tokens; its tokenizer is no
    # vocabulary llguidance can take, and the grammar is not what this tests.
    monkeypatch.setattr(service, "grammar_processor", lambda loaded, grammar: None)
    fake_models["fake-a"].reply = cut + '"}}]}'
    client = make_client()
    ask = [{"role": "user", "content": "Weather in Paris, and the time?"}]
    functions = [{"name": w.name, "description": w.description, "parameters": w.parameters}
                 for w in (WEATHER, TIME)]
    whole, streamed = _chat(client, {
        "messages": ask, "max_tokens": len(cut), "tool_choice": "required",
        "tools": [{"type": "function", "function": f} for f in functions]})
    assert whole == streamed and whole[0] == "length"
    assert [name for name, _ in whole[2]] == (["get_weather"] if "}}," in cut else [])
    whole, streamed = _messages(client, {
        "messages": ask, "max_tokens": len(cut), "tool_choice": {"type": "any"},
        "tools": [{"name": f["name"], "description": f["description"],
                   "input_schema": f["parameters"]} for f in functions]})
    assert whole == streamed and whole[0] == "max_tokens"
    whole, streamed = _responses(client, {
        "input": ask, "max_output_tokens": len(cut), "tool_choice": "required",
        "store": False, "tools": [{"type": "function", **f} for f in functions]})
    assert whole == streamed and whole[0] == "incomplete"


def test_one_of_is_taken_as_any_of():
    """A tool whose parameters use oneOf (Qwen Code sends one) gets a grammar, not a 400."""
    grammar = json_schema_grammar({"type": "object", "properties": {"target": {"oneOf": [
        {"type": "string"}, {"type": "integer"}]}}, "required": ["target"]})
    assert _allows(grammar, '{"target":"a"}') and _allows(grammar, '{"target":7}')
    assert not _allows(grammar, '{"target":true}')
