"""The coding agents themselves, unchanged, run headless through ``semantic-server launch``
against a real server on Gemma 3 270M (the shipped model whose 32k context holds their
prompts): Claude Code (Messages API), Codex CLI (Responses API), Qwen Code and opencode
(chat completions), at the versions ``scripts/install_agents`` pins.

Each agent runs two sessions in one working folder: a task that asks it to read a file it
was given and answer, then the same conversation continued (each agent's own way of
resuming). The server's log is the witness: every request the agent sent was answered
2xx. How much of each turn was cached is printed, not asserted: when an agent rewrites its
history inside the cached part (Claude Code and Qwen Code do, depending on what the model
answered), Gemma's sliding-window layers cannot be cut back to that point (the
warm-sessions issue), so on Gemma it varies from run to run; the caching of continued
conversations is asserted by the Responses, Messages and chat tests on SmolLM2.

Gemma 3 270M is a small base model: whether it calls the tool, answers, or goes on calling
tools is its own choice, so a session ends when the agent exits or once the server has
answered its share of requests (the agent is then stopped), and what it did is printed.
``SEMANTIC_MAX_TOKENS_LIMIT`` keeps each turn short (a turn cut there ends with the API's
length reason, which the agents take in their stride). Nothing an agent sends is stored
beyond the test's folders.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import GEMMA, ROOT
from tests.servers import ServerProcess

AGENT_BIN = ROOT / ".cache" / "agents" / "bin"
SECRET = "The secret word is BANANA."
TASK = "Read the file hello.txt in this folder and tell me the secret word."
FOLLOW_UP = "What was the secret word?"
AGENT_SECONDS = 480  # one session's bound: a cold 14k-token prefill is about 150 s here
TURNS = 2  # requests answered before a session that goes on is stopped

# How each agent runs a task headless, and how it continues its last conversation.
SESSIONS = {
    "claude": (["-p", TASK, "--allowedTools", "Read", "--max-turns", "2"],
               ["-p", FOLLOW_UP, "--continue", "--max-turns", "1"]),
    "codex": (["exec", "--skip-git-repo-check", TASK],
              ["exec", "--skip-git-repo-check", "resume", "--last", FOLLOW_UP]),
    "qwen": (["-p", TASK, "--max-session-turns", "2"],
             ["-p", FOLLOW_UP, "--continue", "--max-session-turns", "1"]),
    "opencode": (["run", *TASK.split()], ["run", "--continue", *FOLLOW_UP.split()]),
}



@pytest.fixture(scope="module")
def agents_server(models_dir):
    for name in SESSIONS:
        binary = AGENT_BIN / name
        if not binary.exists():
            pytest.fail(f"{binary} is missing: run scripts/install_agents (make test does)",
                        pytrace=False)
    server = ServerProcess(GEMMA, max_tokens_limit="64").start(timeout=300)
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


def _answered(server: ServerProcess, since: int) -> int:
    """Generations the server has finished since the ``since``-th logged request."""
    return sum("prompt_tokens" in record for record in _requests(server)[since:])


def _run(server: ServerProcess, agent: str, home: Path, args: list[str]) -> str:
    """One session: the agent runs until it exits, or until the server has answered
    ``TURNS`` of its requests (then it is stopped); returns how it ended and its output."""
    env = {**os.environ, "HOME": str(home), "PATH": f"{AGENT_BIN}{os.pathsep}"
           f"{os.environ['PATH']}", "NO_COLOR": "1"}
    env.pop("CODEX_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    command = [sys.executable, "-m", "semantic_server", "launch", agent, "--url", server.url,
               "--model", GEMMA, "--", *args]
    output = home / f"{agent}-{len(list(home.glob('*.out')))}.out"
    since = len(_requests(server))
    with output.open("w") as sink:
        process = subprocess.Popen(command, cwd=home / "work", env=env,
                                   stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + AGENT_SECONDS
    try:
        while process.poll() is None and _answered(server, since) < TURNS:
            if time.monotonic() > deadline:
                pytest.fail(f"{agent} neither ended nor had {TURNS} requests answered in "
                            f"{AGENT_SECONDS} s:\n{output.read_text()[-2000:]}")
            time.sleep(0.5)  # polling the agent and the server's log, with a deadline
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    ended = "stopped" if process.returncode < 0 else f"exit {process.returncode}"
    return f"{ended}:\n{output.read_text()[-1500:]}"


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
    print(f"{agent} session 1 ({first}\n{agent} session 2 ({second}")
    one, two = logged[before:middle], logged[middle:]
    for record in one + two:
        print({k: record.get(k) for k in ("path", "status", "prompt_tokens",
                                          "cached_tokens", "generated_tokens", "ttft_s")})
    assert one and two, "each session sent at least one request"
    assert all(record["status"] == 200 for record in one + two)
    # How warm the continued session started is printed, not asserted: on Gemma it depends
    # on whether the agent rewrote its history inside the cached part (its sliding-window
    # layers cannot be cut back there: the warm-sessions issue). Measured, for one agent
    # and another run: Claude Code 11,578 of 11,738 cached, then 512 of 11,644.
    longest = max(r["prompt_tokens"] for r in one if "prompt_tokens" in r)
    resumed = [r for r in two if r.get("prompt_tokens", 0) > longest]
    print(f"{agent}: continued session cached {resumed[0]['cached_tokens'] if resumed else None}"
          f" of the first session's {longest} tokens")
