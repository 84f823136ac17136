"""Prometheus metrics, in a registry owned by the app (no process-wide globals).

Three views of the requests, kept apart: ``llama_http_requests_total{route,status,code}`` counts every API
request by its HTTP answer (4xx included, with the error code); ``llama_requests_finished_total{finish_reason}``
counts generations by how they ended (stop, length, cancelled, error); ``llama_requests_refused_total{reason}``
counts the requests the engine turned away before they began (queue full, queue timeout). docs/operations.md maps each
series to its ``vllm:*`` and ``llamacpp:*`` counterpart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.metrics_core import InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
# Outcomes the engine records for requests that never took a slot; all others are finish reasons.
REFUSALS = frozenset({"rejected", "queue_timeout"})
# Routes counted by llama_http_requests_total (the API; probes and the playground's files are not).
API_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/messages",
              "/v1/messages/count_tokens", "/v1/responses", "/v1/embeddings", "/tokenize", "/detokenize",
              "/infill", "/api/chat", "/api/generate", "/api/show", "/api/tags", "/api/ps", "/api/version",
              "/api/embed", "/api/embeddings", "/native/generate")


class _OutcomeCounter:
    """What the engine records as ``requests.labels(outcome=...).inc()``, sorted into finish reasons and
    refusals so the two never share one series."""

    def __init__(self, finished: Counter, refused: Counter) -> None:
        self._finished = finished
        self._refused = refused

    def labels(self, *, outcome: str) -> Counter:
        if outcome in REFUSALS:
            return self._refused.labels(reason=outcome)
        return self._finished.labels(finish_reason=outcome)


class _InfoCollector(Collector):
    """``llama_model_info``: the served model's name, quantization, context and slots, read when scraped
    (the quantization is known once the model has loaded)."""

    def __init__(self, labels: Callable[[], Mapping[str, str]]) -> None:
        self._labels = labels

    def collect(self) -> Iterable[Metric]:
        family = InfoMetricFamily("llama_model", "The served model and how it is run")
        family.add_metric([], dict(self._labels()))
        yield family


class Metrics:
    """The server's metrics. The engine records events; gauges read the engine's state when scraped."""

    def __init__(self) -> None:
        # prometheus_client's switch is process-wide; every registry of this process wants it off (the
        # *_created series double the count of series and no dashboard reads them).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds
        self.http_requests = Counter(
            "llama_http_requests", "API requests by route, HTTP status and error code", ["route", "status", "code"],
            registry=r,
        )
        self.finished = Counter(
            "llama_requests_finished", "Generations ended, by finish reason (stop, length, cancelled, error)",
            ["finish_reason"], registry=r,
        )
        self.refused = Counter(
            "llama_requests_refused", "Requests turned away before a slot took them (rejected: queue full, "
            "429; queue_timeout: 503)", ["reason"], registry=r,
        )
        self.requests = _OutcomeCounter(self.finished, self.refused)
        # Known label values start at 0, so rates and dashboards see the series before the first event.
        for reason in ("stop", "length", "cancelled", "error"):
            self.finished.labels(finish_reason=reason)
        for reason in sorted(REFUSALS):
            self.refused.labels(reason=reason)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_prompt_tokens = Counter(
            "llama_prompt_tokens_cached", "Prompt tokens served from a slot's KV cache", registry=r
        )
        self.generated_tokens = Counter("llama_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            "llama_time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "llama_inter_token_seconds", "Time between two generated tokens of one request",
            buckets=_TOKEN_BUCKETS, registry=r,
        )
        self.request_duration = Histogram(
            "llama_request_duration_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.decode_steps = Counter("llama_decode_steps", "llama_decode calls made by the engine", registry=r)
        self.embedding_requests = Counter(
            "llama_embedding_requests", "Embedding requests ended, by outcome (ok, error, cancelled)", ["outcome"],
            registry=r)
        for outcome in ("ok", "error", "cancelled"):
            self.embedding_requests.labels(outcome=outcome)
        self.embedding_inputs = Counter("llama_embedding_inputs", "Inputs embedded", registry=r)
        self.embedding_tokens = Counter("llama_embedding_tokens", "Tokens of the inputs embedded", registry=r)
        self.embedding_steps = Counter("llama_embedding_steps", "Decodes of the embedding context", registry=r)
        self.draft_tokens = Counter(
            "llama_draft_tokens", "Speculative decoding: tokens drafted for verification", registry=r)
        self.draft_accepted = Counter(
            "llama_draft_accepted_tokens", "Speculative decoding: drafted tokens the model accepted", registry=r)
        self.queue_depth = Gauge("llama_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("llama_slots_busy", "Slots serving a request", registry=r)
        self.slots_total = Gauge("llama_slots_total", "Parallel slots", registry=r)
        # With KV_UNIFIED a prefix shared between slots is held once but counted for each slot that holds it
        # (llama.cpp no longer exposes the count of used cells).
        self.kv_cache_tokens = Gauge("llama_kv_cache_tokens", "Tokens the slots hold in the KV cache (a prefix "
                                     "shared by several slots counts for each)", registry=r)
        self.kv_cache_usage = Gauge("llama_kv_cache_usage_ratio", "Used share of the KV cache (at most 1)",
                                    registry=r)
        # What routers read as "KV in use" (vLLM's kv_cache_usage_perc, llm-d-router's KV scorer): the cells of
        # requests running now. The ratio above also counts the cells idle slots keep for returning conversations,
        # which a router should steer towards, not away from.
        self.kv_cache_running = Gauge("llama_kv_cache_running_ratio", "Share of the KV cache held by requests "
                                      "running now (at most 1)", registry=r)
        self.prompt_cache_bytes = Gauge(
            "llama_prompt_cache_bytes", "Host memory holding the KV cells of conversations that lost their slot "
            "(CACHE_RAM_MIB)", registry=r)
        self.ready = Gauge("llama_ready", "1 once the model is loaded and the server takes requests", registry=r)

    def bind_state(
        self,
        *,
        queue_depth: Callable[[], float],
        slots_busy: Callable[[], float],
        kv_tokens: Callable[[], float],
        running_kv_tokens: Callable[[], float],
        kv_capacity: int,
        slots_total: int,
        prompt_cache_bytes: Callable[[], float],
    ) -> None:
        self.queue_depth.set_function(queue_depth)
        self.prompt_cache_bytes.set_function(prompt_cache_bytes)
        self.slots_busy.set_function(slots_busy)
        self.kv_cache_tokens.set_function(kv_tokens)
        self.kv_cache_usage.set_function(lambda: min(kv_tokens() / kv_capacity, 1.0) if kv_capacity else 0.0)
        self.kv_cache_running.set_function(
            lambda: min(running_kv_tokens() / kv_capacity, 1.0) if kv_capacity else 0.0)
        self.slots_total.set(slots_total)

    def bind_model(self, labels: Callable[[], Mapping[str, str]]) -> None:
        """Publish ``llama_model_info`` with the labels ``labels()`` gives at each scrape."""
        self.registry.register(_InfoCollector(labels))


class HttpMetricsMiddleware:
    """Counts each API request by route, status and error code (the error handlers leave the code in the
    request's state), whatever answered it: a route, validation, the body limit or authentication."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in API_ROUTES and not scope["path"].startswith(
                "/v1/models/"):
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            if metrics is not None:
                route = "/v1/models" if scope["path"].startswith("/v1/models") else scope["path"]
                code = str(scope.get("state", {}).get("error_code") or "")
                metrics.http_requests.labels(route=route, status=str(status or 499), code=code).inc()
