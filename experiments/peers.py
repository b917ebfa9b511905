"""The peer we measure against, ``mlx_lm.server``, set up fairly, and one streaming client
for both servers.

Fair here means the peer gets what we get on this CPU: the same imported weights made
float32 (its quantized kernels would be several times slower than ours), and OpenBLAS
preloaded (MLX's bundled BLAS is 30x slower at prefill).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from semantic_server.blas import blas_status
from tests.servers import free_port, stop_process


def float32_copy(model_dir: Path, dest: Path) -> Path:
    """The same weights as a float32 MLX directory (tokenizer and chat template kept)."""
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model, load, save

    model, tokenizer, config = load(str(model_dir), return_config=True)
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    save(dest, model_dir, model, tokenizer, config)
    return dest


def stream_turn(url: str, messages: list[dict], max_tokens: int, agent: str | None = None,
                model: str | None = None, extra: dict | None = None) -> dict:
    """One streamed greedy chat request (``extra`` joins its body): TTFT, total time,
    decode rate, usage."""
    headers = {"X-Agent-ID": agent} if agent else {}
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    if model:
        body["model"] = model
    started = time.perf_counter()
    first = None
    chunks = []
    usage: dict = {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            delta = data["choices"][0]["delta"] if data.get("choices") else {}
            if delta.get("content") or delta.get("tool_calls"):
                chunks.append(delta.get("content") or "")
                first = first or time.perf_counter()
    end = time.perf_counter()
    tokens = usage.get("completion_tokens", len(chunks))
    return {"ttft": (first or end) - started, "total": end - started, "tokens": tokens,
            "text": "".join(chunks), "prompt": usage.get("prompt_tokens", 0),
            "decode_tps": (tokens - 1) / (end - first) if first and tokens > 1 else 0.0,
            "cached": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


class MlxLmServer:
    """One ``mlx_lm.server`` process on a free port of 127.0.0.1."""

    def __init__(self, model_dir: Path, *extra_args: str) -> None:
        self.model_dir = model_dir
        self.extra_args = extra_args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="mlx-lm-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> MlxLmServer:
        env = dict(os.environ)
        if blas_status().path:
            env["LD_PRELOAD"] = blas_status().path
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlx_lm.server", "--model", str(self.model_dir),
                 "--port", str(self.port), *self.extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)  # polling for readiness
        raise RuntimeError(f"mlx_lm.server not ready after {timeout} s")

    def stop(self) -> None:
        stop_process(self.process)
