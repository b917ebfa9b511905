"""What the fuzz tests share: Hypothesis strategies for request bodies that mix valid
structure with arbitrary JSON, and the check every answer must pass (a well-formed status
below 500, errors in the API's own shape). The fast tier fuzzes the app in process over
fake models, many examples; the real tier a few against a real server and model."""

from __future__ import annotations

from typing import Any

from hypothesis import event
from hypothesis import strategies as st

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
header_text = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                      max_size=140)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), json_values)
contents = st.one_of(st.text(max_size=200), st.lists(st.fixed_dictionaries(
    {"type": st.one_of(st.just("text"), json_values), "text": st.one_of(st.text(max_size=50),
                                                                       json_values)})),
    json_values)
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), min_size=0,
             max_size=4),
    json_values)


def optional_fields(model_id: str) -> dict[str, st.SearchStrategy]:
    """Optional chat fields: plausible values or anything."""
    return {
        "model": st.one_of(st.just(model_id), st.text(max_size=20), json_values),
        "max_tokens": st.one_of(st.integers(-5, 10), json_values),
        "temperature": st.one_of(st.floats(-1, 3), json_values),
        "top_p": st.one_of(st.floats(-1, 2), json_values),
        "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6),
                          st.text(min_size=250, max_size=300), json_values),
        "seed": st.one_of(st.integers(-2**64, 2**64), json_values),
        "n": st.one_of(st.integers(-1, 3), json_values),
        "stream": st.one_of(st.booleans(), json_values),
        "user": st.one_of(header_text, json_values),
    }


def chat_bodies(model_id: str) -> st.SearchStrategy:
    return st.fixed_dictionaries({"messages": messages}, optional=optional_fields(model_id))


def messages_bodies(model_id: str) -> st.SearchStrategy:
    fields = optional_fields(model_id)
    return st.fixed_dictionaries(
        {"messages": messages, "max_tokens": st.one_of(st.integers(-2, 6), json_values)},
        optional={"system": st.one_of(st.text(max_size=50), json_values),
                  "stop_sequences": st.one_of(st.lists(st.text(max_size=5), max_size=6),
                                              json_values),
                  "metadata": st.one_of(st.fixed_dictionaries({"user_id": header_text}),
                                        json_values),
                  **{k: fields[k] for k in ("model", "temperature", "top_p", "stream")}})


ADMIN_PATHS = ["/admin/models/swap", "/admin/models/current", "/admin/models/available",
               "/admin/swaps", "/admin/agents"]


def admin_bodies(loaded: str) -> st.SearchStrategy:
    return st.one_of(json_values, st.fixed_dictionaries(
        {"model_id": st.text(max_size=30).filter(lambda m: m != loaded)},
        optional={"timeout_seconds": st.one_of(st.floats(-5, 5), json_values)}))


def check(status: int, path: str, body: Any) -> None:
    """Every answer: a status below 500; an error in the API's own shape."""
    event(f"status {status}")  # --hypothesis-show-statistics shows the mix
    assert status < 500, str(body)[:500]
    if status >= 400:
        if path == "/v1/messages":  # Anthropic's error shape
            assert body["type"] == "error" and body["error"]["type"].endswith("error")
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"]
