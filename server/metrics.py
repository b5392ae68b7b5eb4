"""Prometheus metrics, named like vLLM's under `nextstep:` so dashboards and habits carry over.

The worker side describes the engine (running/waiting, KV cache, tokens, latencies); the API side
describes HTTP traffic and the errors clients saw. A process running both roles exposes both.
Every label has a bounded set of values (routes are templates, reasons are error codes).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # worker / engine
        self.requests_running = Gauge("nextstep:num_requests_running", "Requests being rendered", registry=r)
        self.requests_waiting = Gauge("nextstep:num_requests_waiting", "Requests waiting inside the engine", registry=r)
        self.images_running = Gauge("nextstep:num_images_running", "Images being rendered", registry=r)
        self.kv_cache_usage = Gauge("nextstep:kv_cache_usage_perc", "KV cache usage, 0..1", registry=r)
        self.prefix_cache_hit_rate = Gauge("nextstep:prefix_cache_hit_rate", "Prefix cache hit rate, 0..1", registry=r)
        self.images = Counter("nextstep:images_generated", "Images generated", registry=r)
        self.image_tokens = Counter("nextstep:image_tokens", "Image tokens generated", registry=r)
        self.prompt_tokens = Counter("nextstep:prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.request_success = Counter("nextstep:request_success", "Jobs completed with images", registry=r)
        self.request_aborted = Counter("nextstep:request_aborted", "Jobs cancelled by their client", registry=r)
        self.job_failures = Counter("nextstep:job_failures", "Jobs that failed, by reason", ["reason"], registry=r)
        self.batch_size = Histogram("nextstep:batch_size", "Images per engine step", buckets=BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram(
            "nextstep:step_duration_seconds", "Engine step time", buckets=STEP_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "nextstep:request_queue_time_seconds", "Enqueue to claim", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_preview = Histogram(
            "nextstep:time_to_first_preview_seconds", "Enqueue to first preview", buckets=LATENCY_BUCKETS, registry=r
        )
        self.e2e_latency = Histogram(
            "nextstep:e2e_request_latency_seconds", "Enqueue to result stored", buckets=LATENCY_BUCKETS, registry=r
        )
        # API
        self.queue_depth = Gauge("nextstep:queue_depth", "Jobs accepted and not finished", registry=r)
        self.request_errors = Counter(
            "nextstep:request_errors", "Error answers, by reason (error code)", ["reason"], registry=r
        )
        self.request_cancellations = Counter(
            "nextstep:request_cancellations", "Jobs the API gave up on, by reason", ["reason"], registry=r
        )
        self.http_requests = Counter(
            "nextstep:http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "nextstep:http_request_duration_seconds",
            "HTTP request time, to the last byte",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
