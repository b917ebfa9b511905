"""The engine's cache logic and the service's rules, on the real engine thread, store and
service over a fake generator (tests/fakes.py): which prefix a turn reuses, what a
cancelled job leaves in its agent's cache, one request per agent, the model a request
names, and what the observer is told."""

from __future__ import annotations

import asyncio
import threading

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache

from semantic_server.cache.agent_store import Lookup, reusable_prefix
from semantic_server.engine.batch_engine import fit_cache, token_out
from semantic_server.engine.jobs import Job, SamplingParams
from semantic_server.engine.service import Admitted, GenerationParams
from semantic_server.errors import ModelNotFound, ModelNotLoaded
from semantic_server.request_outcome import FinishReason
from tests.fakes import (
    DIMS,
    FakeTokenizer,
    append_tokens,
    cached_token_ids,
    run_turn,
)
from tests.polling import wait_until

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("cached", "prompt", "expected"), [
    ([1, 2, 3], [1, 2, 3, 4], 3),  # the whole cache, one new token to prefill
    ([1, 2, 3], [1, 2, 3], 2),  # a retry: one token is left to compute the next logits
    ([1, 2, 9, 9], [1, 2, 3, 4], 2),  # diverged: the common prefix only
    ([5, 6], [1, 2], 0),
    ([], [1, 2], 0),
])
def test_reusable_prefix(cached, prompt, expected):
    assert reusable_prefix(cached, prompt) == expected


def test_fit_cache_trims_a_surplus_and_refuses_what_cannot_be_trimmed():
    layers = [KVCache() for _ in range(DIMS.n_layers)]
    append_tokens(layers, [1, 2, 3, 4, 5])
    fitted, keep = fit_cache(layers, [1, 2, 3, 4, 5], [1, 2, 3, 7, 8])
    assert keep == 3 and cached_token_ids(fitted) == [1, 2, 3]

    rotating = [RotatingKVCache(max_size=4) for _ in range(DIMS.n_layers)]
    append_tokens(rotating, [1, 2, 3, 4, 5, 6])  # wrapped: it cannot be trimmed
    assert fit_cache(rotating, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 9]) == (None, 0)
    assert fit_cache(rotating, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7])[1] == 6


async def test_an_agents_second_turn_prefills_only_its_new_tokens(server):
    first = await run_turn(server.service, "agent-1", "Hi there")
    assert first.text == "Hello from A." and first.outcome.finish_reason is FinishReason.STOP
    assert first.admitted == Admitted("fake-a", first.outcome.prompt_tokens, 0)
    history = [{"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": first.text}]
    second = await run_turn(server.service, "agent-1", "More", history=history)
    # everything before the second user line came from the agent's cache
    rendered = FakeTokenizer().apply_chat_template(
        [*history, {"role": "user", "content": "More"}])
    turn_one = FakeTokenizer().apply_chat_template(history, add_generation_prompt=False)
    assert second.outcome.cached_tokens == len(turn_one) - 1  # up to the reply's end
    assert second.outcome.prompt_tokens == len(rendered)
    assert server.store.lookups[Lookup.HOT] == 1 and server.store.lookups[Lookup.MISS] == 1


async def test_a_cancelled_job_keeps_what_its_agent_cache_holds(server, fake_models):
    fake_models["fake-a"].step_gate = threading.Event()  # decoding waits for the test
    items = server.service.generate("agent-c", [{"role": "user", "content": "Stay"}],
                                    GenerationParams(max_tokens=32))
    admitted = await anext(items)
    assert isinstance(admitted, Admitted)
    await items.aclose()  # the client went away before any token
    fake_models["fake-a"].step_gate = None
    again = await run_turn(server.service, "agent-c", "Stay")
    # the cancelled job had prefilled nothing yet: the store kept no cache for it
    assert again.outcome.cached_tokens == 0
    assert server.snapshot().active_sequences == 0


async def test_one_request_per_agent_at_a_time(server, fake_models):
    fake_models["fake-a"].step_gate = threading.Event()
    first = asyncio.create_task(run_turn(server.service, "same", "one"))
    second = asyncio.create_task(run_turn(server.service, "same", "two"))
    other = asyncio.create_task(run_turn(server.service, "other", "three"))
    await wait_until(lambda: server.snapshot().active_sequences == 2)
    assert server.snapshot().in_flight == 2  # "same"'s second request waits for its lock
    fake_models["fake-a"].step_gate.set()
    results = await asyncio.gather(first, second, other)
    assert all(r.text == "Hello from A." for r in results)


async def test_the_model_a_request_names(server):
    with pytest.raises(ModelNotFound):
        await run_turn(server.service, None, "hi", model="no-such-model")
    with pytest.raises(ModelNotLoaded):
        await run_turn(server.service, None, "hi", model="fake-b")
    assert (await run_turn(server.service, None, "hi", model="fake-a")).admitted.model_id \
        == "fake-a"


async def test_stop_strings_and_length(server):
    cut = await run_turn(server.service, "s", "hi", stop=("from",))
    assert cut.text == "Hello " and cut.outcome.stop_sequence == "from"
    assert cut.outcome.finish_reason is FinishReason.STOP
    short = await run_turn(server.service, "l", "hi", max_tokens=3)
    assert short.text == "Hel" and short.outcome.finish_reason is FinishReason.LENGTH


async def test_every_finished_request_reaches_the_observer(server):
    before = _sample(server, "semantic_tokens_total", kind="generated")
    await run_turn(server.service, "counted", "hi")
    await run_turn(server.service, None, "hi")
    assert _sample(server, "semantic_tokens_total", kind="generated") == before + 2 * 13
    assert _sample(server, "semantic_request_seconds_count", model="fake-a",
                   fingerprint="fp-fake-a") == 2


async def test_anonymous_requests_share_a_prefix_cache(server):
    await run_turn(server.service, None, "a long shared question")
    again = await run_turn(server.service, None, "a long shared question")
    assert again.outcome.cached_tokens == again.outcome.prompt_tokens - 1


def _sample(server, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_retried_turn_reuses_its_prompt_past_a_wrapped_window(start, fake_models):
    # Like Gemma 3: a sliding layer of 16 tokens wraps during the first turn, so its cache
    # cannot be cut back to the prompt; the checkpoint taken at the prompt's end can.
    fake_models["fake-a"].window = 16
    server = await start()
    question = "a question much longer than the sliding window"
    first = await run_turn(server.service, "retrier", question)
    retry = await run_turn(server.service, "retrier", question)
    assert retry.outcome.cached_tokens == first.outcome.prompt_tokens - 1
    assert retry.text == first.text
    # the next turn extends the reply as usual (the whole history was cached)
    history = [{"role": "user", "content": question},
               {"role": "assistant", "content": retry.text}]
    follow = await run_turn(server.service, "retrier", "and?", history=history)
    turn_one = FakeTokenizer().apply_chat_template(history, add_generation_prompt=False)
    assert follow.outcome.cached_tokens == len(turn_one) - 1
    hot = server.store.residency()
    assert hot.hot_agents == 1 and server.pool.used <= server.pool.budget_bytes


def test_masked_tokens_are_no_alternatives():
    # Under a grammar, disallowed tokens have log-probability -inf: never "top" ones.
    job = Job("j", None, [1], 4, SamplingParams(), print, logprobs=3)
    response = type("R", (), {"token": 0, "logprobs": mx.array(
        [-0.1, -float("inf"), -2.5, -float("inf")])})()
    out = token_out(job, response)
    assert out.logprob == pytest.approx(-0.1) and [t for t, _ in out.top] == [0, 2]


async def test_the_engine_measures_each_models_prefill_rate(server):
    await run_turn(server.service, "agent-rate", "word " * 60)  # a prompt over 32 tokens
    rates = server.store.policy.prefill_seconds_per_token
    assert len(rates) == 1 and next(iter(rates.values())) > 0
