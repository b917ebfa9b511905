"""LoRA adapters on a real server: SmolLM2 with the two adapters ``scripts/train_adapters``
trains (``make test``'s setup runs it): ``capitals`` answers in capitals, ``signature`` ends
its answers with `` -- Sig``. These are trained adapters, not computed ones: what they do
is what training taught them, checked here through the official OpenAI client."""

from __future__ import annotations

import threading

import httpx
import pytest
from openai import OpenAI

from tests.conftest import ROOT, SMOLLM2
from tests.e2e.helpers import ADMIN, KEY, scrape, value
from tests.servers import ServerProcess

ADAPTERS_DIR = ROOT / "adapters"
QUESTIONS = ("What is your favorite color?", "How do I make a cup of tea?")
TOKENS = 10  # enough to see capitals; the base's answers run to it, the adapters' end sooner
SIGNED_TOKENS = 32  # a signature comes at the end of an answer: room for the whole answer


def capitals(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 3 and all(c.isupper() for c in letters)


def signed(text: str) -> bool:
    return text.rstrip().endswith("-- Sig")


@pytest.fixture(scope="module")
def lora_server(models_dir):
    for name in ("capitals", "signature"):
        if not (ADAPTERS_DIR / name / "adapters.safetensors").exists():
            pytest.fail(f"adapter {name} is missing: run scripts/train_adapters (make test "
                        f"does)", pytrace=False)
    server = ServerProcess(SMOLLM2, admin_key=KEY, adapters_dir=str(ADAPTERS_DIR),
                           lora_slots="3").start()
    yield server
    server.stop()


def ask(server: ServerProcess, question: str, model: str = SMOLLM2, agent: str | None = None,
        history: list[dict] | None = None, max_tokens: int = TOKENS) -> tuple[str, int, int]:
    """The reply's text, its prompt tokens and how many of them were cached."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                    default_headers={"X-Agent-ID": agent} if agent else None)
    reply = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[*(history or []), {"role": "user", "content": question}])
    details = reply.usage.prompt_tokens_details
    return (reply.choices[0].message.content, reply.usage.prompt_tokens,
            (details.cached_tokens if details else 0) or 0)


def swap_adapter(server: ServerProcess, adapter: str | None) -> dict:
    response = httpx.post(f"{server.url}/admin/adapters/swap", headers=ADMIN, timeout=60,
                          json={"model_id": SMOLLM2, "adapter": adapter})
    assert response.status_code == 200, response.text
    return response.json()


def current(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/admin/models/current", headers=ADMIN).json()


def test_swaps_show_each_adapters_behaviour_without_reloading(lora_server):
    before = current(lora_server)
    base = [ask(lora_server, q)[0] for q in QUESTIONS]
    assert not any(capitals(t) or signed(t) for t in base), base
    to_caps = swap_adapter(lora_server, "capitals")
    assert to_caps["copied"] and to_caps["slot"] > 0 and to_caps["old_adapter"] is None
    caps = [ask(lora_server, q)[0] for q in QUESTIONS]
    assert all(capitals(t) for t in caps), caps
    swap_adapter(lora_server, "signature")
    sig = [ask(lora_server, q, max_tokens=SIGNED_TOKENS)[0] for q in QUESTIONS]
    assert all(signed(t) and not capitals(t) for t in sig), sig
    back = swap_adapter(lora_server, None)
    assert back["old_adapter"] == "signature" and back["slot"] == 0
    assert ask(lora_server, QUESTIONS[0])[0] == base[0]  # none: the base model again
    again = swap_adapter(lora_server, "capitals")
    assert not again["copied"]  # still in its slot: nothing to copy
    assert ask(lora_server, QUESTIONS[0])[0] == caps[0]
    swap_adapter(lora_server, None)
    after = current(lora_server)
    # The base was never reloaded: the same load (version), weights and memory (what grew
    # is KV: the anonymous requests' prefix cache, counted in the KV pool).
    assert [v["version"] for v in after["versions"]] == [v["version"] for v in before["versions"]]
    assert after["fingerprint"] == before["fingerprint"]
    kv = [m["kv_pool"]["used_bytes"] + m["kv_pool"]["reserved_bytes"] for m in (before, after)]
    grown = after["memory"]["mlx_active_bytes"] - before["memory"]["mlx_active_bytes"]
    assert grown - (kv[1] - kv[0]) < 4 * 2**20
    swaps = httpx.get(f"{lora_server.url}/admin/swaps", headers=ADMIN).json()["data"]
    assert [s["kind"] for s in swaps] == ["adapter"] * 5
    assert value(scrape(lora_server), "semantic_adapter_swaps_total", result="success") == 5


def test_per_request_adapters_decode_in_one_batch(lora_server):
    """Requests naming different adapters run together, each row on its own adapter, and
    give the text each gives alone."""
    models = [f"{SMOLLM2}:capitals", f"{SMOLLM2}:signature", SMOLLM2, f"{SMOLLM2}:capitals"]
    question = QUESTIONS[0]
    tokens = [SIGNED_TOKENS if model.endswith("signature") else TOKENS for model in models]
    alone = [ask(lora_server, question, model, max_tokens=n)[0]
             for model, n in zip(models, tokens, strict=True)]
    assert capitals(alone[0]) and signed(alone[1]) and not capitals(alone[2])
    together: list[str | None] = [None] * len(models)
    start = threading.Barrier(len(models))

    def run(i: int) -> None:
        start.wait(timeout=30)
        together[i] = ask(lora_server, question, models[i], max_tokens=tokens[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
    ids = [m.id for m in OpenAI(base_url=f"{lora_server.url}/v1", api_key="x")
           .models.list().data]
    assert f"{SMOLLM2}:capitals" in ids and f"{SMOLLM2}:signature" in ids


def test_an_agents_cache_is_never_used_under_another_adapter(lora_server):
    agent, caps, sig = "adapter-agent", f"{SMOLLM2}:capitals", f"{SMOLLM2}:signature"
    question = "Tell me about the sea."
    first, prompt, _ = ask(lora_server, question, caps, agent)
    history = [{"role": "user", "content": question}, {"role": "assistant", "content": first}]
    before = value(scrape(lora_server), "semantic_cache_lookups_total", outcome="other_adapter")
    _, _, cached_sig = ask(lora_server, "And the rivers?", sig, agent, history)
    assert cached_sig == 0  # the capitals cache is not signature's
    assert value(scrape(lora_server), "semantic_cache_lookups_total",
                 outcome="other_adapter") == before + 1
    reply, _, cached_caps = ask(lora_server, "And the rivers?", caps, agent, history)
    assert cached_caps >= 0.9 * prompt  # its own cache came back with its adapter
    assert capitals(reply)


def test_a_request_in_flight_during_a_swap_finishes_on_its_adapter(lora_server):
    swap_adapter(lora_server, "capitals")
    question = "Write a long story about a dragon and a knight."
    expected = ask(lora_server, question, max_tokens=48)[0]
    client = OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=SMOLLM2, max_tokens=48, temperature=0, stream=True,
        messages=[{"role": "user", "content": question}])
    chunks, swapped = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
            if swapped is None:  # mid-generation: the next requests get signature
                swapped = swap_adapter(lora_server, "signature")
    assert swapped is not None and swapped["old_adapter"] == "capitals"
    assert "".join(chunks) == expected  # every token on the adapter it was admitted with
    assert signed(ask(lora_server, QUESTIONS[1], max_tokens=SIGNED_TOKENS)[0])
    swap_adapter(lora_server, None)
