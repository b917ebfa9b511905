"""Bad clients against a real server (not a test): what each got, and how /health fared.

Each case starts its own server on a free loopback port (SmolLM2, or Gemma for the window
case), plays one kind of bad client, bounded in requests and time, and records what the
client got and the worst /health latency while it ran. ``--src DIR`` runs the servers from
another checkout's ``src`` (an older commit, for a before/after comparison in one run);
``--label`` names the run in the JSON.

Usage: .venv/bin/python scripts/attack.py [--src DIR] [--label after] [--cases a,b]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import ServerProcess  # noqa: E402

SMOLLM2, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
KEY = "attack-key"
NOTES = ("Here are my notes about the expedition. The team left the harbour at dawn, crossed "
         "the strait, and set up camp near the old lighthouse. ") * 24
STORY = [{"role": "user", "content": "Write a very long story about a lighthouse."}]


class HealthWatch:
    """Polls /health every 0.1 s in a thread and keeps the worst latency seen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/health", timeout=120)
            self.worst = max(self.worst, time.monotonic() - started)
            self._stop.wait(0.1)


def chat(server: ServerProcess, messages: list[dict], agent: str | None = None,
         timeout: float = 300, **body: object) -> httpx.Response:
    headers = {"X-Agent-ID": agent} if agent else {}
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=timeout, headers=headers,
                      json={"messages": messages, "temperature": 0, **body})


def case_long_stop(server: ServerProcess) -> dict:
    """A 200,000-character stop string on a 64-token request."""
    with HealthWatch(server.url) as watch:
        started = time.monotonic()
        reply = chat(server, STORY, max_tokens=64, stop="x" * 200_000)
        seconds = time.monotonic() - started
    return {"status": reply.status_code, "request_s": round(seconds, 2),
            "worst_health_s": round(watch.worst, 3)}


def case_abandoned(server: ServerProcess) -> dict:
    """A client gives up on a non-streamed 400-token request after 1 s; the same agent
    asks again at once."""
    with HealthWatch(server.url) as watch:
        with contextlib.suppress(httpx.ReadTimeout):
            chat(server, STORY, agent="quitter", timeout=1.0, max_tokens=400)
        started = time.monotonic()
        again = chat(server, STORY, agent="quitter", max_tokens=1)
        waited = time.monotonic() - started
    return {"status": again.status_code, "next_request_s": round(waited, 2),
            "worst_health_s": round(watch.worst, 3)}


def case_slow_reader(server: ServerProcess) -> dict:
    """A streaming client with a 1 KB receive buffer that never reads (4,096 tokens asked);
    then a swap (it must drain that request) and the same agent's next request."""
    body = json.dumps({"messages": STORY, "max_tokens": 4096, "stream": True,
                       "temperature": 0}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nX-Agent-ID: sleeper\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        with HealthWatch(server.url) as watch:
            deadline = time.monotonic() + 10
            while server.health()["active_sequences"] == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            started = time.monotonic()
            swapped = httpx.post(f"{server.url}/admin/models/swap", timeout=400,
                                 headers={"X-Admin-Key": KEY},
                                 json={"model_id": SMOLLM2, "timeout_seconds": 300})
            swap_s = time.monotonic() - started
            started = time.monotonic()
            again = chat(server, STORY, agent="sleeper", max_tokens=1)
            next_s = time.monotonic() - started
    finally:
        sock.close()
    return {"swap_status": swapped.status_code, "swap_s": round(swap_s, 2),
            "next_status": again.status_code, "next_request_s": round(next_s, 2),
            "worst_health_s": round(watch.worst, 3)}


def case_disk_budget(server: ServerProcess) -> dict:
    """Four agents with caches; a disk budget of about 2.5 caches; swap away and back."""
    agents = [f"budget-{i}" for i in range(4)]
    history = {}
    for agent in agents:
        messages = [{"role": "user", "content": f"{agent}: {NOTES[:1200]} Summarise."}]
        first = chat(server, messages, agent=agent, max_tokens=4).json()
        history[agent] = [*messages, first["choices"][0]["message"],
                          {"role": "user", "content": "Go on."}]
    admin = {"X-Admin-Key": KEY}
    away = httpx.post(f"{server.url}/admin/models/swap", headers=admin, timeout=300,
                      json={"model_id": GEMMA})
    back = httpx.post(f"{server.url}/admin/models/swap", headers=admin, timeout=300,
                      json={"model_id": SMOLLM2})
    warm = sum(chat(server, history[agent], agent=agent, max_tokens=1).json()["usage"][
        "prompt_tokens_details"]["cached_tokens"] > 0 for agent in agents)
    return {"swap_away": [away.status_code, away.json().get("status")],
            "swap_back": [back.status_code, back.json().get("status")],
            "agents_warm_after": f"{warm}/{len(agents)}"}


def case_gemma_retry(server: ServerProcess) -> dict:
    """On Gemma (512-token window), an agent with a long history retries its turn."""
    messages = [{"role": "user", "content": NOTES + "Summarise my notes."}]
    chat(server, messages, agent="retrier", max_tokens=8)
    retry = chat(server, messages, agent="retrier", max_tokens=8).json()["usage"]
    return {"prompt_tokens": retry["prompt_tokens"],
            "cached_on_retry": retry["prompt_tokens_details"]["cached_tokens"],
            "cached_share": round(retry["prompt_tokens_details"]["cached_tokens"]
                                  / retry["prompt_tokens"], 3)}


def case_flood(server: ServerProcess) -> dict:
    """40 requests at once against a server that lets 8 wait."""
    with HealthWatch(server.url) as watch, concurrent.futures.ThreadPoolExecutor(40) as pool:
        started = time.monotonic()
        statuses = list(pool.map(lambda i: chat(server, STORY, agent=f"flood-{i}",
                                                max_tokens=8).status_code, range(40)))
        seconds = time.monotonic() - started
    return {"statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "all_done_s": round(seconds, 2), "worst_health_s": round(watch.worst, 3)}


def case_web_page(server: ServerProcess) -> dict:
    """What a web page can send: another Host (DNS rebinding), a form post."""
    rebound = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                         headers={"Host": "attacker.example"},
                         json={"messages": STORY, "max_tokens": 1})
    form = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      content=json.dumps({"messages": STORY, "max_tokens": 1}),
                      headers={"Content-Type": "text/plain"})
    return {"other_host": rebound.status_code, "text_plain_post": form.status_code}


def case_damaged_file(server: ServerProcess) -> dict:
    """An agent's cache file is damaged on disk (bytes inside its arrays flipped)."""
    messages = [{"role": "user", "content": NOTES[:800] + " Summarise."}]
    chat(server, messages, agent="damaged", max_tokens=4)
    httpx.post(f"{server.url}/admin/models/swap", headers={"X-Admin-Key": KEY}, timeout=300,
               json={"model_id": SMOLLM2})  # writes the agent's cache to disk
    files = sorted(Path(server.env["SEMANTIC_CACHE_DIR"]).glob("*/*.safetensors"))
    data = bytearray(files[-1].read_bytes())
    for i in range(len(data) - 4096, len(data) - 8, 64):
        data[i] ^= 0x55
    files[-1].write_bytes(bytes(data))
    reply = chat(server, messages, agent="damaged", max_tokens=4)
    quarantined = list(Path(server.env["SEMANTIC_CACHE_DIR"]).glob("quarantine/*.reason.txt"))
    return {"status": reply.status_code,
            "cached_tokens": reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            if reply.status_code == 200 else None,
            "quarantined": len(quarantined)}


CASES: dict[str, tuple[Callable[[ServerProcess], dict], str, dict[str, str]]] = {
    "long_stop": (case_long_stop, SMOLLM2, {}),
    "abandoned": (case_abandoned, SMOLLM2, {}),
    "slow_reader": (case_slow_reader, SMOLLM2, {"send_timeout_seconds": "3"}),
    "disk_budget": (case_disk_budget, SMOLLM2, {"cache_disk_bytes": str(int(2.5 * 14e6))}),
    "gemma_retry": (case_gemma_retry, GEMMA, {}),
    "flood": (case_flood, SMOLLM2, {"max_queued": "8"}),
    "web_page": (case_web_page, SMOLLM2, {}),
    "damaged_file": (case_damaged_file, SMOLLM2, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, help="run the servers from this src folder")
    parser.add_argument("--label", default="after")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" /
                        "attack.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    run = results.setdefault(args.label, {})
    for name in args.cases.split(","):
        play, model, settings = CASES[name]
        server = ServerProcess(model, admin_key=KEY, **settings)
        if args.src:
            server.env["PYTHONPATH"] = str(args.src.resolve())
        server.start()
        try:
            started = time.monotonic()
            run[name] = play(server)
        except Exception as exc:  # recorded: a case that breaks is a result too
            run[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            server.stop()
        print(f"{args.label:>7}  {name:<13} {time.monotonic() - started:6.1f} s  {run[name]}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
