"""GET /metrics in Prometheus format: requests, latency and TTFT by adapter, tokens, queue, tiers, loads, evictions,
requests received by protocol.

Request metrics are observed when a response ends; engine and tier figures are read at scrape time.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from mux.engine.stream import RequestStream

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
MAX_ADAPTER_LABELS = 256  # per-adapter series beyond this many adapters are counted under "_other"
OTHER = "_other"
# requests received, by protocol: HTTP by path (openai: /v1/..., kserve: /v2..., lorax: /, /generate, ..., other:
# health, admin, metrics, dashboard), grpc: each RPC and each request on a stream. A fixed set of labels.
PROTOCOLS = ("openai", "kserve", "lorax", "grpc", "other")
_LORAX_PATHS = {"/", "/generate", "/generate_stream", "/info"}


def http_protocol(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path == "/v2" or path.startswith("/v2/"):
        return "kserve"
    return "lorax" if path in _LORAX_PATHS else "other"


class Metrics:
    def __init__(self, state) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        r = self.registry
        by = ["adapter", "version"]  # version: the adapter's version that served ("" for the base model)
        self.requests = Counter("mux_requests", "Finished generations", [*by, "finish_reason"], registry=r)
        self.latency = Histogram(
            "mux_request_latency_seconds", "Submit to last token", by, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "mux_time_to_first_token_seconds", "Submit to first token", by, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("mux_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.prompt_tokens = Counter("mux_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.internal_errors = Counter(  # by route template: a bounded set of label values
            "mux_internal_errors", "Requests answered 500 by the last-resort guard (bugs)", ["route"], registry=r
        )
        r.register(_EngineCollector(state))
        self.protocols = _Protocols()
        r.register(self.protocols)
        self._labels: set[str] = set()
        self.recent_ttft: deque[float] = deque(maxlen=8192)  # drained by the dashboard history (history.py)

    def label(self, model: str) -> str:
        """The adapter label for `model`: itself for the first MAX_ADAPTER_LABELS names seen, then "_other"
        (thousands of adapters must not become thousands of time series per metric)."""
        if model not in self._labels and len(self._labels) < MAX_ADAPTER_LABELS:
            self._labels.add(model)
        return model if model in self._labels else OTHER

    def observe(self, model: str, version: int | None, streams: list[RequestStream]) -> None:
        model = self.label(model)
        version = "" if version is None or model == OTHER else str(version)
        for s in streams:
            reason = s.finish_reason or "disconnected"
            self.requests.labels(model, version, reason).inc()
            self.prompt_tokens.labels(model).inc(len(s.prompt_ids))
            self.tokens.labels(model).inc(s.num_tokens)
            if s.first_token_at is not None:
                self.ttft.labels(model, version).observe(s.first_token_at - s.submitted_at)
                self.recent_ttft.append(s.first_token_at - s.submitted_at)
            if s.finished_at is not None:
                self.latency.labels(model, version).observe(s.finished_at - s.submitted_at)

    def received(self, protocol: str) -> None:
        """Count one request as it arrives (on the event loop: plain increments do)."""
        self.protocols.counts[protocol] += 1

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class _Protocols:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(PROTOCOLS, 0)  # every label present from the start, at 0

    def collect(self):
        yield _counter("mux_protocol_requests", "Requests received, by protocol", "protocol", self.counts)


class _EngineCollector:
    def __init__(self, state) -> None:
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        e, a = engine.stats(), engine.adapters.stats()
        yield _gauge("mux_running_requests", "Sequences in the running batch", e["running"])
        yield _gauge("mux_waiting_requests", "Admission queue depth", e["waiting"])
        yield _gauge("mux_kv_blocks_free", "Free KV cache blocks", e["kv_blocks"]["free"])
        yield _gauge("mux_kv_blocks_total", "KV cache blocks", e["kv_blocks"]["total"])
        yield _gauge(
            "mux_kv_blocks_cached", "KV blocks the prefix cache holds (in use or free)", e["kv_blocks"]["cached"]
        )
        pc = e["prefix_cache"]
        yield _counter(
            "mux_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", None, pc["queried_tokens"]
        )
        yield _counter("mux_prefix_cache_hits", "Prompt tokens served from the prefix cache", None, pc["hit_tokens"])
        yield _counter("mux_engine_faults", "Engine faults survived, by where (step, loop)", "where", e["faults"])
        dev, host = a["tiers"]["device"], a["tiers"]["host"]
        yield _gauge("mux_device_slots_used", "Device LoRA slots holding an adapter", dev["used"])
        yield _gauge("mux_device_slots_pinned", "Device LoRA slots pinned by requests or operators", dev["pinned"])
        yield _gauge("mux_device_slots_capacity", "Device LoRA slots", dev["capacity"])
        yield _gauge("mux_host_adapter_bytes", "Bytes of adapters in the host tier", host["used_bytes"])
        yield _gauge("mux_host_adapter_bytes_capacity", "Host tier byte bound", host["capacity_bytes"])
        yield _gauge("mux_host_adapters", "Adapters in the host tier", host["count"])
        c = a["counters"]
        yield _counter("mux_adapter_loads", "Adapter loads by path", "path", c["loads"])
        yield _counter("mux_adapter_evictions", "Adapter evictions by path", "path", c["evictions"])
        yield _counter("mux_adapter_hits", "Adapter lookups served from a tier", "tier", c["hits"])
        yield _counter("mux_adapter_misses", "Adapter lookups that read the disk", None, c["misses"])
        b = self.state.batch_jobs.stats()
        batches = GaugeMetricFamily("mux_batches", "Batch jobs by status", labels=["status"])
        for status, n in b["by_status"].items():
            batches.add_metric([status], n)
        yield batches
        lines = {"completed": b["lines_completed"], "failed": b["lines_failed"]}
        yield _counter("mux_batch_lines", "Batch-job lines finished since start, by outcome", "outcome", lines)
        yield _gauge(
            "mux_batch_tokens_per_second", "Tokens batch-job lines generated, over the last 10 s", b["tokens_per_s"]
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, label: str | None, values) -> CounterMetricFamily:
    if label is None:
        return CounterMetricFamily(name, doc, value=values)
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family
