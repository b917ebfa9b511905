"""``semantic-server launch AGENT``: one command from install to a coding agent on this
server (Claude Code, Codex CLI, Qwen Code, opencode), as Ollama's ``ollama launch`` does.

It finds the server (or starts one in the background and says where its log is and how to
stop it), picks a model whose context holds the agent's prompt (a model that cannot is
refused before the agent starts, naming both numbers), writes the agent's settings the
way that agent documents them in files this command owns (never the user's own config:
Claude Code's ``--settings`` file, a Codex profile ``<CODEX_HOME>/semantic-server.config.toml``,
an opencode config named by ``OPENCODE_CONFIG``, Qwen Code's environment), and runs the
agent with the arguments after ``--``. ``--config`` only writes (and prints what a user
sets to start the agent by hand); ``--restore`` removes what it wrote.

Each session's identity is the agent's own (Claude Code's session header, Codex's
``session-id``, opencode's ``x-session-id``; Qwen Code sends none, so its base URL names a
session per working folder, ``/session/<id>/v1``), and every session of an agent shares its
prefix (``api/identity.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from semantic_server.config import Settings

PROFILE = "semantic-server"  # the Codex profile and the provider name this command writes
OUTPUT_TOKENS = 4096  # what an agent is told it may ask for (the server's default limit)
START_SECONDS = 600.0  # how long a server started here may take to load its model


class LaunchError(Exception):
    """What stops a launch, said in one line."""


@dataclass(frozen=True)
class Target:
    """Where the agent is pointed: the server, the model and its context, and a key."""

    url: str
    model: str
    context: int
    key: str


@dataclass
class Setup:
    """What running an agent against a target takes: its environment, the arguments that
    go before the user's, and the files written for it."""

    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    files: dict[Path, str] = field(default_factory=dict)  # path -> content

    def write(self) -> None:
        """Each file private to the user from its first byte (it may hold an API key)."""
        for path, content in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(content)


def config_dir() -> Path:
    """Where this command keeps the files it owns."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "semantic-server" / "launch"


def _claude(target: Target) -> Setup:
    env = {"ANTHROPIC_BASE_URL": target.url, "ANTHROPIC_AUTH_TOKEN": target.key,
           "ANTHROPIC_MODEL": target.model, "ANTHROPIC_SMALL_FAST_MODEL": target.model,
           "ANTHROPIC_DEFAULT_HAIKU_MODEL": target.model,
           "ANTHROPIC_DEFAULT_SONNET_MODEL": target.model,
           "ANTHROPIC_DEFAULT_OPUS_MODEL": target.model,
           "ANTHROPIC_DEFAULT_FABLE_MODEL": target.model, "ANTHROPIC_DEFAULT_MODEL": target.model,
           "CLAUDE_CODE_SUBAGENT_MODEL": target.model,
           "CLAUDE_CODE_WORKFLOW_SUBAGENT_MODEL": target.model,
           "CLAUDE_CODE_AUTO_MODE_MODEL": target.model,
           "CLAUDE_CODE_NO_MODEL_FALLBACK": "1",  # no Anthropic model as a fallback
           # its auto-compaction threshold is the context less the output it may ask for
           "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(target.context),
           "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(OUTPUT_TOKENS),
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "CLAUDE_CODE_ATTRIBUTION_HEADER": "0"}
    settings = config_dir() / "claude-settings.json"
    return Setup(env, ["--settings", str(settings)],
                 {settings: json.dumps({"env": env}, indent=2) + "\n"})


def codex_home() -> Path:
    return Path(os.environ.get("CODEX_HOME") or Path.home() / ".codex")


def _codex(target: Target) -> Setup:
    profile = codex_home() / f"{PROFILE}.config.toml"
    toml = "\n".join([
        f"model = {json.dumps(target.model)}", f'model_provider = "{PROFILE}"', "",
        f'[model_providers."{PROFILE}"]', f'name = "{PROFILE}"',
        f"base_url = {json.dumps(target.url + '/v1')}", 'wire_api = "responses"',
        'env_key = "SEMANTIC_SERVER_API_KEY"', "",
        "[features]", "plugins = false", "remote_plugin = false", "",
        "[analytics]", "enabled = false", ""])
    return Setup({"SEMANTIC_SERVER_API_KEY": target.key}, ["--profile", PROFILE],
                 {profile: toml})


def project_session(agent: str) -> str:
    """A session id for an agent that sends none: one per working folder, as its
    ``--continue`` resumes the folder's latest conversation."""
    digest = hashlib.blake2b(str(Path.cwd().resolve()).encode(), digest_size=8).hexdigest()
    return f"{agent}-{digest}"


def _qwen(target: Target) -> Setup:
    """Qwen Code sends no session and takes no headers: its session goes in the URL
    (``api/session_path.py``)."""
    env = {"OPENAI_BASE_URL": f"{target.url}/session/{project_session('qwen')}/v1",
           "OPENAI_API_KEY": target.key, "OPENAI_MODEL": target.model}
    lines = "".join(f"export {name}={json.dumps(value)}\n" for name, value in env.items())
    return Setup(env, [], {config_dir() / "qwen.env": lines})


def _opencode(target: Target) -> Setup:
    path = config_dir() / "opencode.json"
    config = {"$schema": "https://opencode.ai/config.json", "provider": {PROFILE: {
        "npm": "@ai-sdk/openai-compatible", "name": PROFILE,
        "options": {"baseURL": target.url + "/v1", "apiKey": target.key},
        "models": {target.model: {"name": target.model, "limit": {
            "context": target.context, "output": OUTPUT_TOKENS}}}}},
        "model": f"{PROFILE}/{target.model}", "small_model": f"{PROFILE}/{target.model}",
        "autoupdate": False, "share": "disabled"}
    env = {"OPENCODE_CONFIG": str(path), "OPENCODE_DISABLE_MODELS_FETCH": "1",
           "OPENCODE_DISABLE_AUTOUPDATE": "1"}
    return Setup(env, [], {path: json.dumps(config, indent=2) + "\n"})


@dataclass(frozen=True)
class Agent:
    name: str
    command: str
    package: str  # the npm package, at the version tested here
    context: int  # the least context that holds its prompt and a few turns
    setup: Callable[[Target], Setup]


AGENTS = {agent.name: agent for agent in (
    Agent("claude", "claude", "@anthropic-ai/claude-code@2.1.328", 16384, _claude),
    Agent("codex", "codex", "@openai/codex@0.169.0", 16384, _codex),
    Agent("qwen", "qwen", "@qwen-code/qwen-code@0.24.4", 20480, _qwen),
    Agent("opencode", "opencode", "opencode-ai@1.18.33", 12288, _opencode),
)}


def _get(url: str, path: str, key: str, timeout: float = 5.0) -> dict | None:
    """A JSON GET; None when nothing answers."""
    try:
        response = httpx.get(url + path, timeout=timeout,
                             headers={"Authorization": f"Bearer {key}"})
        data = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError):  # no server, or not this one
        return None
    return data if isinstance(data, dict) else None


def start_server(url: str, model: str | None) -> None:
    """Start ``semantic-server serve`` in the background on ``url``'s port; wait for it."""
    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise LaunchError(f"no server answers at {url}, and one can be started only on this "
                          "machine's loopback address")
    log_path = config_dir().parent / f"serve-{parsed.port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    command = [sys.executable, "-m", "semantic_server", "serve", "--host", parsed.hostname,
               "--port", str(parsed.port or 80), *(["--model", model] if model else [])]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"started semantic-server (pid {process.pid}) at {url}; log: {log_path}; "
          f"stop it with: kill {process.pid}", file=sys.stderr)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LaunchError(f"the server exited with {process.returncode}; see {log_path}")
        if _get(url, "/health", "", timeout=2) is not None:
            return
        time.sleep(0.5)  # waiting for the model to load, with a deadline
    raise LaunchError(f"the server did not become ready in {START_SECONDS:.0f} s; "
                      f"see {log_path}")


def pick_model(agent: Agent, models: list[dict], serving: str | None,
               wanted: str | None) -> tuple[str, int]:
    """The model to point ``agent`` at and its context: ``wanted`` if its context holds
    the agent's prompt, else (unnamed) the serving model or the first that holds it."""
    contexts = {m["id"]: m.get("context_length") or 0 for m in models if ":" not in m["id"]}
    if wanted is not None:
        if wanted not in contexts:
            raise LaunchError(f"the server has no model {wanted!r} (it has: "
                              f"{', '.join(contexts) or 'none'})")
        if contexts[wanted] < agent.context:
            raise LaunchError(
                f"{wanted}'s context is {contexts[wanted]:,} tokens, and {agent.name}'s "
                f"prompt needs at least {agent.context:,}: choose a longer-context model"
                + _suggestion(agent, contexts))
        return wanted, contexts[wanted]
    fitting = sorted((m for m, c in contexts.items() if c >= agent.context),
                     key=lambda m: m != serving)
    if not fitting:
        raise LaunchError(f"no model on the server holds {agent.name}'s prompt (at least "
                          f"{agent.context:,} tokens; the longest context is "
                          f"{max(contexts.values(), default=0):,})")
    return fitting[0], contexts[fitting[0]]


def _suggestion(agent: Agent, contexts: dict[str, int]) -> str:
    fitting = [f"{m} ({c:,})" for m, c in contexts.items() if c >= agent.context]
    return f", such as {fitting[0]}" if fitting else ""


def api_key(settings: Settings) -> str:
    """The key the agent presents: the server's first API key, or a placeholder (agents
    insist on one; a server without keys ignores it)."""
    keys = settings.api_keys
    return keys[0].get_secret_value() if keys else "semantic-server"


def find(agent: Agent) -> str:
    path = shutil.which(agent.command)
    if path is None:
        raise LaunchError(f"{agent.command} is not installed; install it with: "
                          f"npm install -g {agent.package}")
    return path


def restore(agent: Agent) -> list[Path]:
    """Remove the files a launch of ``agent`` wrote; returns those it removed."""
    blank = Target("http://127.0.0.1", "-", 0, "-")
    removed = [path for path in agent.setup(blank).files if path.exists()]
    for path in removed:
        path.unlink()
    return removed


def describe(setup: Setup) -> str:
    """What a user sets to start the agent by hand."""
    lines = [f"wrote {path}" for path in setup.files]
    lines += [f"export {name}={json.dumps(value)}" for name, value in setup.env.items()]
    if setup.args:
        lines.append("run it with: " + " ".join(setup.args))
    return "\n".join(lines)


def launch(agent_name: str, url: str | None, model: str | None, config_only: bool,
           agent_args: list[str], settings: Settings) -> int:
    """Run (or with ``config_only`` only configure) the agent; returns its exit status."""
    agent = AGENTS[agent_name]
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6
    url = (url or f"http://{host}:{settings.port}").rstrip("/")
    key = api_key(settings)
    command = None if config_only else find(agent)
    if _get(url, "/health", key) is None:
        start_server(url, model)
    listing = _get(url, "/v1/models", key)
    health = _get(url, "/health", key) or {}
    if listing is None or not isinstance(listing.get("data"), list):
        raise LaunchError(f"{url} did not list its models; is it a semantic-server?")
    chosen, context = pick_model(agent, listing["data"], health.get("model"), model)
    setup = agent.setup(Target(url, chosen, context, key))
    setup.write()
    if config_only:
        print(describe(setup))
        return 0
    print(f"{agent.name} on {chosen} at {url} (context {context:,} tokens)", file=sys.stderr)
    return subprocess.call([command, *setup.args, *agent_args],
                           env={**os.environ, **setup.env})
