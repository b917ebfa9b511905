"""``semantic-server launch``'s own logic, without agents or a server: which model it
picks, the refusal when no context holds the agent's prompt, the settings each agent gets,
and that ``--restore`` removes only what it wrote."""

from __future__ import annotations

import json
import tomllib

import pytest

from semantic_server.launch import AGENTS, LaunchError, Target, pick_model, restore

MODELS = [{"id": "small", "context_length": 8192}, {"id": "long", "context_length": 32768},
          {"id": "small:adapter", "context_length": 8192}]
TARGET = Target("http://127.0.0.1:8000", "long", 32768, "key-123456")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("CODEX_HOME", raising=False)
    return tmp_path


def test_a_model_too_small_for_the_agent_is_refused_naming_both_numbers():
    with pytest.raises(LaunchError) as refused:
        pick_model(AGENTS["claude"], MODELS, "small", "small")
    message = str(refused.value)
    assert "8,192" in message and "16,384" in message and "long (32,768)" in message


def test_unnamed_picks_the_serving_model_when_it_holds_the_prompt_else_another():
    both = [*MODELS, {"id": "longer", "context_length": 65536}]
    assert pick_model(AGENTS["codex"], both, "longer", None) == ("longer", 65536)
    assert pick_model(AGENTS["codex"], both, "small", None) == ("long", 32768)
    with pytest.raises(LaunchError, match="no model on the server holds"):
        pick_model(AGENTS["opencode"], MODELS[:1], "small", None)


def test_each_agent_is_pointed_at_the_server_in_its_own_documented_way(home):
    claude = AGENTS["claude"].setup(TARGET)
    assert claude.env["ANTHROPIC_BASE_URL"] == TARGET.url and claude.args[0] == "--settings"
    codex = AGENTS["codex"].setup(TARGET)
    [(profile, text)] = codex.files.items()
    assert profile == home / ".codex" / "semantic-server.config.toml"
    provider = tomllib.loads(text)["model_providers"]["semantic-server"]
    assert provider["wire_api"] == "responses" and provider["base_url"] == TARGET.url + "/v1"
    assert codex.args == ["--profile", "semantic-server"]
    qwen = AGENTS["qwen"].setup(TARGET).env["OPENAI_BASE_URL"]
    assert qwen.startswith(TARGET.url + "/session/qwen-") and qwen.endswith("/v1")
    opencode = AGENTS["opencode"].setup(TARGET)
    [(path, text)] = opencode.files.items()
    assert opencode.env["OPENCODE_CONFIG"] == str(path)
    assert json.loads(text)["model"] == "semantic-server/long"


def test_restore_removes_only_what_launch_wrote(home):
    own = home / ".codex" / "config.toml"
    own.parent.mkdir()
    own.write_text('model = "mine"\n')
    for agent in AGENTS.values():
        agent.setup(TARGET).write()
    for agent in AGENTS.values():
        assert restore(agent)
        assert restore(agent) == []
    assert own.read_text() == 'model = "mine"\n'
    assert [p for p in home.rglob("*") if p.is_file()] == [own]
