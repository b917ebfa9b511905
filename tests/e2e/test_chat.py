"""The OpenAI chat API end to end: a real server process and the official client."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

from tests.polling import wait_for

GREEDY = {"temperature": 0}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_multi_turn_agent_reuses_its_cache(smol_server):
    client = smol_server.client("agent-multi-turn")
    first = client.chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=20, **GREEDY
    )
    history = [
        *FRANCE,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And what is the capital of Germany?"},
    ]
    second = client.chat.completions.create(
        model=smol_server.model, messages=history, max_tokens=20, **GREEDY
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    turn1 = first.usage.prompt_tokens + first.usage.completion_tokens
    print("turn 1 tokens", turn1, "turn 2 cached", cached, "of", second.usage.prompt_tokens)
    assert cached >= turn1 - 4
    assert cached < second.usage.prompt_tokens

    # A new agent with this history starts from what the first agent holds, and answers
    # exactly as the first did
    fresh = smol_server.client("agent-never-seen").chat.completions.create(
        model=smol_server.model, messages=history, max_tokens=20, **GREEDY
    )
    assert fresh.usage.prompt_tokens_details.cached_tokens == fresh.usage.prompt_tokens - 1
    assert fresh.choices[0].message.content == second.choices[0].message.content
    assert second.model == smol_server.model


def test_new_agents_start_from_a_system_prompt_other_agents_hold(smol_server):
    system = {"role": "system", "content": "You are the archive's assistant. " + " ".join(
        f"Rule {i}: answer from the archive's ledgers only." for i in range(20))}
    questions = ["Which ships came in 1820?", "Who kept the ledgers?"]

    def ask(agent: str, question: str):
        return smol_server.client(agent).chat.completions.create(
            model=smol_server.model, max_tokens=12, **GREEDY,
            messages=[system, {"role": "user", "content": question}])

    reference = ask("archive-ref", questions[1])  # the first to send this system prompt
    assert reference.usage.prompt_tokens_details.cached_tokens == 0
    system_tokens = reference.usage.prompt_tokens - 20  # the question and template's tail
    first = ask("archive-1", questions[0])
    assert first.usage.prompt_tokens_details.cached_tokens >= system_tokens
    second = ask("archive-2", questions[1])  # shares all but the last token with archive-ref
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    assert second.choices[0].message.content == reference.choices[0].message.content


def test_stream_joins_to_the_same_text(smol_server):
    client = smol_server.client()
    whole = client.chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=24, **GREEDY
    )
    chunks = list(
        client.chat.completions.create(
            model=smol_server.model,
            messages=FRANCE,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]

    with httpx.stream(
        "POST",
        f"{smol_server.url}/v1/chat/completions",
        timeout=120,
        json={"messages": FRANCE, "max_tokens": 8, "stream": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "chat.completion.chunk" for line in lines[:-1])


def test_stop_strings_and_length(smol_server):
    client = smol_server.client()
    full = client.chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=20, **GREEDY
    )
    text = full.choices[0].message.content
    assert "Paris" in text
    cut = client.chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=20, stop=[" Paris"], **GREEDY
    )
    assert cut.choices[0].message.content == text[: text.index(" Paris")]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=3, **GREEDY
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_same_seed_same_text(smol_server):
    client = smol_server.client()
    story = [{"role": "user", "content": "Write one sentence about a cat."}]

    def sample(seed):
        return (
            client.chat.completions.create(
                model=smol_server.model, messages=story, max_tokens=24, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


SECRETS = [
    "Zanzibar",
    "Kilimanjaro",
    "Reykjavik",
    "Timbuktu",
    "Ulaanbaatar",
    "Valparaiso",
    "Samarkand",
    "Marrakesh",
]


def test_eight_agents_keep_their_own_context(smol_server):
    def converse(i: int) -> list[str]:
        client = smol_server.client(f"secret-agent-{i}")
        messages = [
            {
                "role": "system",
                "content": f"The secret word is {SECRETS[i]}.",
            }
        ]
        answers = []
        for turn in range(3):
            messages.append({"role": "user", "content": "Repeat the secret word."})
            reply = client.chat.completions.create(
                model=smol_server.model, messages=messages, max_tokens=16, **GREEDY
            )
            answers.append(reply.choices[0].message.content)
            if turn > 0:
                assert reply.usage.prompt_tokens_details.cached_tokens > 0
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(converse, range(8)))
    for i, answers in enumerate(results):
        print(SECRETS[i], answers)
        others = [s for s in SECRETS if s != SECRETS[i]]
        assert all(not any(o in a for o in others) for a in answers), "context leaked"
        assert any(SECRETS[i] in a for a in answers), f"agent {i} never said its secret"


def test_dropped_stream_frees_its_place(smol_server):
    long_story = [{"role": "user", "content": "Tell me a very long story about dragons."}]
    with httpx.stream(
        "POST",
        f"{smol_server.url}/v1/chat/completions",
        timeout=120,
        json={"messages": long_story, "max_tokens": 400, "stream": True},
    ) as r:
        for count, _ in enumerate(r.iter_lines()):
            if count == 6:
                break  # leave mid-stream: closing the connection drops the request
    client = smol_server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda i: client.chat.completions.create(
                    model=smol_server.model, messages=FRANCE, max_tokens=8, **GREEDY
                ),
                range(8),
            )
        )
    assert all(r.choices[0].message.content for r in replies)
    health = smol_server.health()
    assert health["active_sequences"] == 0 and health["in_flight"] == 0, health


BAD_REQUESTS = [
    ("invalid json", b"{not json", {}, 400, None),
    ("not an object", b"[1, 2]", {}, 400, None),
    ("missing messages", {"model": None}, {}, 400, "messages"),
    ("wrong type", {"messages": "hello"}, {}, 400, "messages"),
    (
        "unknown role",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {},
        400,
        "messages.0.role",
    ),
    ("n=2", {"messages": FRANCE, "n": 2}, {}, 400, "n"),
    ("negative max_tokens", {"messages": FRANCE, "max_tokens": -5}, {}, 400, "max_tokens"),
    ("temperature as text", {"messages": FRANCE, "temperature": "hot"}, {}, 400, "temperature"),
    ("negative seed", {"messages": FRANCE, "seed": -1, "temperature": 1}, {}, 400, "seed"),
    ("seed beyond 63 bits", {"messages": FRANCE, "seed": 2**64}, {}, 400, "seed"),
    ("deeply nested json", b"[" * 50_000 + b"]" * 50_000, {}, 400, None),
    (
        "oversized body",
        {"messages": [{"role": "user", "content": "x" * (5 * 2**20)}]},
        {},
        413,
        None,
    ),
    (
        "prompt beyond context",
        {"messages": [{"role": "user", "content": "hello " * 3000}]},
        {},
        400,
        "messages",
    ),
    ("invalid agent id", {"messages": FRANCE}, {"X-Agent-ID": "../../etc/passwd"}, 400, "agent_id"),
    ("unknown model", {"messages": FRANCE, "model": "no-such-model"}, {}, 404, None),
    ("available but not loaded", {"messages": FRANCE, "model": "gemma3-270m"}, {}, 409, None),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "param"),
    BAD_REQUESTS,
    ids=[row[0] for row in BAD_REQUESTS],
)
def test_bad_input_gets_a_clear_error(smol_server, name, body, headers, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{smol_server.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param
    ok = smol_server.client().chat.completions.create(
        model=smol_server.model, messages=FRANCE, max_tokens=2, **GREEDY
    )
    assert ok.choices[0].message.content


def test_a_client_that_gives_up_frees_its_agent_at_once(smol_server):
    # A non-streamed request of 400 tokens takes about 30 s here; the client leaves after
    # 3 s, once it runs. The server must notice and cancel the job (before, the agent's
    # next request waited for all 400 tokens).
    story = [{"role": "user", "content": "Write a very long story about a lighthouse."}]

    def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{smol_server.url}/v1/chat/completions", timeout=3.0,
                       headers={"X-Agent-ID": "quitter"},
                       json={"messages": story, "max_tokens": 400, "temperature": 0})

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        client = pool.submit(give_up)
        wait_for(lambda: smol_server.health()["active_sequences"] == 1, timeout=10,
                 what="the request running")
        client.result()
    wait_for(lambda: smol_server.health()["active_sequences"] == 0, timeout=10,
             what="the abandoned job cancelled")
    again = smol_server.client("quitter").chat.completions.create(
        model=smol_server.model, messages=story, max_tokens=2, **GREEDY)
    # its prompt had been prefilled before it was cancelled: the agent kept that cache
    assert again.usage.prompt_tokens_details.cached_tokens > 0
