"""``GET /metrics``: the engine's state and the requests' latencies in Prometheus text format.

Names follow vLLM's (``vllm:num_requests_running`` -> ``llamahome:num_requests_running``), so a
dashboard or alert written for vLLM needs only the prefix changed:

| metric | type | what |
|---|---|---|
| ``llamahome:num_requests_running`` | gauge | requests admitted (prefilling or decoding) |
| ``llamahome:num_requests_waiting`` | gauge | requests queued for KV memory or a batch slot |
| ``llamahome:kv_cache_bytes_held`` | gauge | KV bytes the running requests hold now |
| ``llamahome:kv_cache_bytes_reserved`` | gauge | their worst cases, reserved at admission |
| ``llamahome:kv_cache_bytes_pool`` | gauge | ``serve.kv_memory`` |
| ``llamahome:kv_cache_keep_ratio`` | gauge | tokens held / tokens seen over the running rows |
| ``llamahome:generation_tokens_per_second`` | gauge | over the last 10 s |
| ``llamahome:prompt_tokens_total`` | counter | prompt tokens prefilled |
| ``llamahome:generation_tokens_total`` | counter | tokens generated |
| ``llamahome:kv_cache_evicted_tokens_total`` | counter | evicted (counted when a request ends) |
| ``llamahome:request_success_total{finished_reason}`` | counter | stop or length |
| ``llamahome:requests_rejected_total{reason}`` | counter | queue_full (429), too_large (400) |
| ``llamahome:time_to_first_token_seconds`` | histogram | arrival to first token |
| ``llamahome:inter_token_latency_seconds`` | histogram | between two tokens of a request |
| ``llamahome:e2e_request_latency_seconds`` | histogram | arrival to last token |
| ``llamahome:request_queue_time_seconds`` | histogram | arrival to admission |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of its own (several servers per process)."""

    def __init__(self) -> None:
        """Create every metric at zero."""
        self.registry = CollectorRegistry()
        reg = {"registry": self.registry}
        p = "llamahome:"
        self.running = Gauge(f"{p}num_requests_running", "Requests admitted (prefill or decode).",
                             **reg)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests waiting for KV memory or a "
                             "batch slot.", **reg)
        self.kv_held = Gauge(f"{p}kv_cache_bytes_held", "KV bytes held by the running requests.",
                             **reg)
        self.kv_reserved = Gauge(f"{p}kv_cache_bytes_reserved", "KV bytes reserved (worst cases "
                                 "of the running requests).", **reg)
        self.kv_pool = Gauge(f"{p}kv_cache_bytes_pool", "KV memory pool (serve.kv_memory).", **reg)
        self.keep_ratio = Gauge(f"{p}kv_cache_keep_ratio", "Tokens held / tokens seen over the "
                                "running requests.", **reg)
        self.tokens_per_second = Gauge(f"{p}generation_tokens_per_second", "Tokens generated per "
                                       "second over the last 10 s.", **reg)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens prefilled.", **reg)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", **reg)
        self.evicted_tokens = Counter(f"{p}kv_cache_evicted_tokens", "Tokens evicted from KV "
                                      "caches (counted when a request ends).", **reg)
        self.success = Counter(f"{p}request_success", "Requests answered.", ["finished_reason"],
                               **reg)
        self.rejected = Counter(f"{p}requests_rejected", "Requests refused at admission.",
                                ["reason"], **reg)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY, **reg)
        self.inter_token = Histogram(f"{p}inter_token_latency_seconds", "Time between two tokens "
                                     "of a request.", buckets=_TOKEN, **reg)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY, **reg)
        self.queue_time = Histogram(f"{p}request_queue_time_seconds", "Arrival to admission.",
                                    buckets=_LATENCY, **reg)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
