"""A real semantic-server process on a free port of 127.0.0.1: for the end-to-end tests,
the experiments and the benchmarks alike."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m semantic_server serve`` with the given settings (SEMANTIC_* variables)."""

    def __init__(self, model: str, max_file_bytes: int | None = None, **settings: str) -> None:
        self.model = model
        self.max_file_bytes = max_file_bytes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server gets its own cache folder unless the test shares one on purpose.
        settings.setdefault("cache_dir", tempfile.mkdtemp(prefix="agent-caches-"))
        self.env = {
            **os.environ,
            "SEMANTIC_MODELS_DIR": str(MODELS_DIR),
            **{f"SEMANTIC_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log_path = Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> ServerProcess:
        command = [sys.executable, "-m", "semantic_server", "serve", "--model", self.model,
                   "--port", str(self.port)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            preexec_fn=self._limit_file_size)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling for readiness, not covering a race
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def _limit_file_size(self) -> None:
        """In the child: the OS refuses any write that would grow a file past the limit
        (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write raises), a real failing write
        like a full disk's, without mounting a tiny filesystem."""
        if self.max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_file_bytes, self.max_file_bytes))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def client(self, agent: str | None = None) -> openai.OpenAI:
        headers = {"X-Agent-ID": agent} if agent else None
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key="unused",
            max_retries=0,
            default_headers=headers,
            timeout=300,
        )

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()
