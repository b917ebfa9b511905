"""The coding agents themselves, unchanged, run headless through ``semantic-server launch``
against a real server on Gemma 3 270M (the shipped model whose 32k context holds their
prompts): Claude Code (Messages API), Codex CLI (Responses API), Qwen Code and opencode
(chat completions), at the versions ``scripts/install_agents`` pins.

Each agent runs two sessions in one working folder: a task that asks it to read a file it
was given and answer, then the same conversation continued (each agent's own way of
resuming). The server's log is the witness: every request the agent sent was answered
2xx, and the continued session's first request found the first session's prompt cached.
Gemma 3 270M is a small base model: whether it calls the tool or answers at once is its
own choice (printed, not asserted); ``SEMANTIC_MAX_TOKENS_LIMIT`` keeps its turns short.
Nothing an agent sends is stored beyond the test's temporary folders.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GEMMA, ROOT
from tests.servers import ServerProcess

AGENT_BIN = ROOT / ".cache" / "agents" / "bin"
SECRET = "The secret word is BANANA."
TASK = "Read the file hello.txt in this folder and tell me the secret word."
FOLLOW_UP = "What was the secret word?"
AGENT_SECONDS = 420  # one session's bound: a cold 11k-token prefill is about 100 s here

# How each agent runs a task headless, and how it continues its last conversation.
SESSIONS = {
    "claude": (["-p", TASK, "--allowedTools", "Read", "--max-turns", "3"],
               ["-p", FOLLOW_UP, "--continue", "--max-turns", "2"]),
    "codex": (["exec", "--skip-git-repo-check", TASK],
              ["exec", "--skip-git-repo-check", "resume", "--last", FOLLOW_UP]),
    "qwen": (["-p", TASK, "--max-session-turns", "3"],
             ["-p", FOLLOW_UP, "--continue", "--max-session-turns", "2"]),
    "opencode": (["run", *TASK.split()], ["run", "--continue", *FOLLOW_UP.split()]),
}


@pytest.fixture(scope="module")
def agents_server(models_dir):
    for name in SESSIONS:
        binary = AGENT_BIN / name
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run scripts/install_agents (make test does)",
                        pytrace=False)
    server = ServerProcess(GEMMA, max_tokens_limit="96").start(timeout=300)
    yield server
    server.stop()


def _requests(server: ServerProcess) -> list[dict]:
    """Every request the server has logged: its one line per request, with its status."""
    lines = []
    for line in server.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "request" and "status" in record:
            lines.append(record)
    return lines


def _run(server: ServerProcess, agent: str, home: Path, args: list[str],
         ) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PATH": f"{AGENT_BIN}{os.pathsep}"
           f"{os.environ['PATH']}", "NO_COLOR": "1"}
    env.pop("CODEX_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    command = [sys.executable, "-m", "semantic_server", "launch", agent, "--url", server.url,
               "--model", GEMMA, "--", *args]
    return subprocess.run(command, cwd=home / "work", env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=AGENT_SECONDS)


@pytest.mark.parametrize("agent", sorted(SESSIONS))
def test_an_agent_runs_two_sessions_every_request_answered_and_warm(agents_server, agent,
                                                                    tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "hello.txt").write_text(SECRET + "\n")
    before = len(_requests(agents_server))
    first = _run(agents_server, agent, tmp_path, SESSIONS[agent][0])
    middle = len(_requests(agents_server))
    second = _run(agents_server, agent, tmp_path, SESSIONS[agent][1])
    logged = _requests(agents_server)
    print(f"{agent} session 1 (exit {first.returncode}):\n{first.stdout[-800:]}\n"
          f"{first.stderr[-800:]}")
    print(f"{agent} session 2 (exit {second.returncode}):\n{second.stdout[-800:]}\n"
          f"{second.stderr[-800:]}")
    one, two = logged[before:middle], logged[middle:]
    for record in one + two:
        print({k: record.get(k) for k in ("path", "status", "prompt_tokens",
                                          "cached_tokens", "generated_tokens", "ttft_s")})
    assert one and two, "each session sent at least one request"
    assert all(record["status"] == 200 for record in one + two)
    assert first.returncode == 0 and second.returncode == 0
    # the continued session resumes the first one's conversation from the cache (opencode
    # also sends a title request of its own, another conversation: hence the largest)
    longest = max(r["prompt_tokens"] for r in one if "prompt_tokens" in r)
    assert max(r.get("cached_tokens", 0) for r in two) >= 0.9 * longest
    # and within a session, each later turn of a conversation finds the one before it cached
    for session in (one, two):
        turns: dict[str, list[dict]] = {}
        for record in session:
            if "prompt_tokens" in record:
                turns.setdefault(record["agent"], []).append(record)
        for conversation in turns.values():
            for earlier, later in itertools.pairwise(conversation):
                assert later["cached_tokens"] >= 0.9 * earlier["prompt_tokens"]
