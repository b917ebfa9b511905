"""Anthropic's Messages API with the official anthropic client, on the agent caches."""

from __future__ import annotations

import anthropic
import pytest

from tests.conftest import SMOLLM2


def client_for(server, agent: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0,
                               default_headers={"X-Agent-ID": agent})


@pytest.mark.parametrize("stream", [False, True])
def test_three_turn_agent_reads_its_cache(smol_server, stream):
    client = client_for(smol_server, f"anthropic-agent-{stream}")
    system = "You are a concise assistant."
    messages = []
    cache_reads = []
    for question in ("What is the capital of France?", "And of Italy?", "And of Spain?"):
        messages.append({"role": "user", "content": question})
        if stream:
            with client.messages.stream(model=SMOLLM2, max_tokens=16, system=system,
                                        messages=messages, extra_body={"temperature": 0}) as events:
                text = "".join(events.text_stream)
                final = events.get_final_message()
            assert final.content[0].text == text
        else:
            final = client.messages.create(model=SMOLLM2, max_tokens=16, system=system,
                                           messages=messages, extra_body={"temperature": 0})
            text = final.content[0].text
        assert text and final.stop_reason in ("end_turn", "max_tokens")
        cache_reads.append(final.usage.cache_read_input_tokens)
        messages.append({"role": "assistant", "content": text})
    print("cache reads per turn", cache_reads)
    assert cache_reads[0] == 0
    assert cache_reads[1] > 0 and cache_reads[2] > cache_reads[1]


def test_stop_sequences_and_max_tokens(smol_server):
    client = client_for(smol_server, "anthropic-stops")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.messages.create(model=SMOLLM2, max_tokens=20, messages=question,
                                  extra_body={"temperature": 0}).content[0].text
    assert "Paris" in full
    cut = client.messages.create(model=SMOLLM2, max_tokens=20, messages=question,
                                 extra_body={"temperature": 0}, stop_sequences=[" Paris"])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == " Paris"
    assert cut.content[0].text == full[: full.index(" Paris")]
    short = client.messages.create(model=SMOLLM2, max_tokens=2, messages=question,
                                   extra_body={"temperature": 0})
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=SMOLLM2, max_tokens=-1, messages=question)
    assert bad.value.body["type"] == "error"
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=4, messages=question)
    assert missing.value.body["error"]["type"] == "not_found_error"
