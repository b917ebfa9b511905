"""Prometheus metrics and structured JSON logs.

Events (a request finished, a swap ended) are counted when they happen, reported through
the Observer protocol (observer.py); states (cache residency, pool blocks, memory,
in-flight requests) are read when Prometheus scrapes, so they can never drift from the
objects that own them. Each app has its own registry, so several servers can live in one
process (the experiments, the tests).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from semantic_server.request_outcome import Outcome
from semantic_server.swap_result import AdapterSwapResult, SwapResult

if TYPE_CHECKING:
    from semantic_server.snapshot import ServerSnapshot

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
PAUSE_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1, 1)


class Metrics:
    """The Prometheus registry of one server: an Observer for events, a collector for
    states (read from the server's snapshot at scrape time)."""

    def __init__(self, read_snapshot: Callable[[], ServerSnapshot]) -> None:
        self.registry = CollectorRegistry()
        self.swaps = Counter("semantic_swaps", "Model swaps by result and path",
                             ["result", "mode"], registry=self.registry)
        self.promotion_pause = Histogram(
            "semantic_swap_promotion_pause_seconds", "How long a dual swap's promotion kept "
            "new requests from being admitted", buckets=PAUSE_BUCKETS, registry=self.registry)
        self.adapter_swaps = Counter("semantic_adapter_swaps", "Adapter swaps by result",
                                     ["result"], registry=self.registry)
        self.adapter_copy = Histogram(
            "semantic_adapter_swap_copy_seconds", "How long an adapter swap took to copy the "
            "adapter's weights into the prepared layers", buckets=PAUSE_BUCKETS,
            registry=self.registry)
        self.swap_steps = Histogram("semantic_swap_step_seconds", "Duration of each swap step",
                                    ["step"], buckets=LATENCY_BUCKETS, registry=self.registry)
        # A model version is its weights' fingerprint: a bounded label, unlike a load count.
        self.ttft = Histogram("semantic_request_ttft_seconds", "Time to first token",
                              ["model", "fingerprint"], buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        self.latency = Histogram("semantic_request_seconds", "Request latency, end to end",
                                 ["model", "fingerprint"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.tokens = Counter("semantic_tokens", "Tokens by kind", ["kind"],
                              registry=self.registry)
        self.registry.register(_StateCollector(read_snapshot))

    def request_finished(self, outcome: Outcome) -> None:
        self.tokens.labels("prompt").inc(outcome.prompt_tokens)
        self.tokens.labels("cached").inc(outcome.cached_tokens)
        self.tokens.labels("generated").inc(outcome.completion_tokens)
        version = (outcome.model_id, outcome.fingerprint)
        if outcome.ttft_seconds is not None:
            self.ttft.labels(*version).observe(outcome.ttft_seconds)
        self.latency.labels(*version).observe(outcome.seconds)

    def swap_finished(self, result: SwapResult) -> None:
        self.swaps.labels(result.status.value, result.mode.value).inc()
        if result.promotion_pause_ms is not None:
            self.promotion_pause.observe(result.promotion_pause_ms / 1e3)
        for step in (*result.steps, *result.rollback_steps):
            self.swap_steps.labels(step.name.value).observe(step.duration_ms / 1e3)


    def adapter_swap_finished(self, result: AdapterSwapResult) -> None:
        self.adapter_swaps.labels(result.status.value).inc()
        if result.copied:
            self.adapter_copy.observe(result.copy_ms / 1e3)


class _StateCollector(Collector):
    """Gauges (and the cache counters the store keeps) read from a snapshot at scrape time."""

    def __init__(self, read_snapshot: Callable[[], ServerSnapshot]) -> None:
        self.read_snapshot = read_snapshot

    def collect(self) -> Iterator[Any]:
        state = self.read_snapshot()
        info = InfoMetricFamily("semantic_model", "The loaded model")
        if state.model_id:
            info.add_metric([], {"model_id": state.model_id, "tag": state.tag or ""})
        yield info
        lookups = CounterMetricFamily("semantic_cache_lookups", "Agent cache lookups by outcome",
                                      labels=["outcome"])
        for outcome, count in state.lookups.items():
            lookups.add_metric([outcome.value], count)
        yield lookups
        yield CounterMetricFamily("semantic_cache_write_failures",
                                  "Agent cache files that could not be written (a full disk)",
                                  value=state.write_failures)
        shared = CounterMetricFamily("semantic_redis_errors",
                                     "Calls to the shared Redis store that failed, by operation "
                                     "(the server served on from memory and its folder)",
                                     labels=["operation"])
        for operation in ("put", "get", "delete", "lease"):
            shared.add_metric([operation], state.shared_errors.get(operation, 0))
        yield shared
        yield CounterMetricFamily("semantic_cache_write_behind_waits",
                                  "Evictions that waited for the disk: the caches waiting "
                                  "for the writer thread held their bound",
                                  value=state.write_behind_waits)
        yield CounterMetricFamily("semantic_cache_disk_deletions",
                                  "Cold agent caches deleted to keep within the disk budget",
                                  value=state.disk_deletions)
        caches = state.caches
        for name, doc, labels, values in (
            ("semantic_agents", "Agents with a cache, by residency", ["residency"],
             {("hot",): caches.hot_agents, ("cold",): caches.cold_agents}),
            ("semantic_agent_cache_bytes", "Bytes of agent caches, by residency", ["residency"],
             {("hot",): caches.hot_bytes, ("cold",): caches.cold_bytes}),
            ("semantic_kv_bytes", "KV pool bytes", ["state"],
             {("used",): state.pool.used_bytes, ("reserved",): state.pool.reserved_bytes,
              ("free",): state.pool.budget_bytes - state.pool.used_bytes
              - state.pool.reserved_bytes}),
            ("semantic_cache_writing_bytes", "Memory held by evicted caches waiting for "
             "the writer thread (outside the KV pool; see SEMANTIC_CACHE_WRITE_BEHIND_BYTES)",
             [],
             {(): state.writing_bytes}),
            ("semantic_requests_in_flight", "Requests running", [],
             {(): state.in_flight}),
            ("semantic_requests_pinned", "Requests pinned to each resident model version",
             ["model", "state"],
             {(v.model_id, v.state): v.pinned for v in state.versions}),
            ("semantic_requests_held", "Requests waiting for a swap or their agent's lock",
             [], {(): state.held}),
            ("semantic_requests_queued", "Requests waiting for a batch slot or KV room", [],
             {(): state.queued}),
            ("semantic_memory_bytes", "Memory", ["kind"],
             {("mlx_active",): state.memory.active_bytes, ("rss",): state.memory.rss_bytes}),
        ):
            family = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                 "logger": record.name, "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
