"""Real processes on free loopback ports, started and stopped by PID: our server
(``ServerProcess``), Redis and nginx. The end-to-end tests start theirs with these, and so
do the experiments, the benchmark scripts and ``deploy.replicas``."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import openai
import redis

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 60) -> int | None:
    """Send ``sig`` to a child still running, wait for it (killing it after ``timeout``),
    and return its exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


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
        return stop_process(self.process, sig, timeout)

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


class RedisProcess:
    """A real ``redis-server`` from the system's packages on a free loopback port, with a
    password and no persistence; stopped by its PID. Fails loudly when Redis is missing
    (``scripts/install_services`` installs it)."""

    def __init__(self, password: str = "test-redis-password") -> None:
        self.password = password
        self.port = free_port()
        # percent-encoded, as the URL's user must write it (README, SEMANTIC_CACHE_STORE)
        self.url = f"redis://:{quote(password, safe='')}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/install_services")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            time.sleep(0.05)  # polling for readiness, not covering a race
        raise RuntimeError(f"redis-server not ready after {timeout} s")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def stop(self) -> None:
        stop_process(self.process)


class NginxProcess:
    """nginx from the system's packages on a free loopback port, in front of ``upstreams``
    (``deploy/nginx.conf.template``: agents spread by consistent hashing of X-Agent-ID);
    stopped by its PID."""

    TEMPLATE = ROOT / "deploy" / "nginx.conf.template"

    def __init__(self, upstreams: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="semantic-nginx-"))
        servers = "\n".join(f"        server {u.removeprefix('http://')} max_fails=1 "
                            f"fail_timeout=10s;" for u in upstreams)
        user = "user root;" if os.geteuid() == 0 else ""  # workers need a user as root
        self.config = self.prefix / "nginx.conf"
        self.config.write_text(self.TEMPLATE.read_text().format(
            prefix=self.prefix, servers=servers, port=self.port, user=user))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> NginxProcess:
        binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                          else None)
        if binary is None:
            raise RuntimeError("nginx is not installed: run scripts/install_services")
        self.process = subprocess.Popen(
            [binary, "-p", str(self.prefix), "-c", str(self.config), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.prefix / "error.log"
                raise RuntimeError(f"nginx exited: {log.read_text() if log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)  # polling for readiness, not covering a race
        raise RuntimeError(f"nginx not listening after {timeout} s")

    def stop(self) -> None:
        stop_process(self.process)
