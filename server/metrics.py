"""Prometheus metrics, in a registry owned by the app (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """The server's metrics. The engine records events; gauges read the engine's state when scraped."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "llama_requests", "Generation requests by outcome", ["outcome"], registry=r
        )
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
        self.queue_depth = Gauge("llama_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("llama_slots_busy", "Slots serving a request", registry=r)
        self.slots_total = Gauge("llama_slots_total", "Parallel slots", registry=r)
        self.kv_cache_tokens = Gauge("llama_kv_cache_tokens", "KV-cache cells holding a token", registry=r)
        self.kv_cache_usage = Gauge("llama_kv_cache_usage_ratio", "Used share of the KV cache", registry=r)
        self.ready = Gauge("llama_ready", "1 once the model is loaded and the server takes requests", registry=r)

    def bind_state(
        self,
        *,
        queue_depth: Callable[[], float],
        slots_busy: Callable[[], float],
        kv_tokens: Callable[[], float],
        kv_capacity: int,
        slots_total: int,
    ) -> None:
        self.queue_depth.set_function(queue_depth)
        self.slots_busy.set_function(slots_busy)
        self.kv_cache_tokens.set_function(kv_tokens)
        self.kv_cache_usage.set_function(lambda: kv_tokens() / kv_capacity if kv_capacity else 0.0)
        self.slots_total.set(slots_total)
