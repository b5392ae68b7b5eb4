"""Prometheus metrics, named like vLLM's under `nextstep:` so dashboards and habits carry over.

The worker side describes the engine (running/waiting, KV cache, tokens, latencies); the API side
describes HTTP traffic and the errors clients saw. A process running both roles exposes both.
Every label has a bounded set of values (routes are templates, reasons are error codes).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# every reason a worker fails a job with; exported at 0 from the start, so Prometheus sees the first failure
# as an increase (a series born at 1 has none, and an alert on increase() would miss it)
JOB_FAILURE_REASONS = ("dead_letter", "engine_error", "invalid_request", "timeout")

# device name -> (bytes allocated by tensors, bytes reserved by the caching allocator, bytes on the device)
GpuMemoryReading = dict[str, tuple[int, int, int]]


def cuda_memory_in_use() -> GpuMemoryReading:
    """The CUDA devices this process holds memory on; empty on CPU and in processes that never used CUDA.

    Reads the caching allocator's counters and the cached device properties, never the GPU itself, so a
    scrape from the server's thread cannot disturb the worker's CUDA graph captures.
    """
    torch = sys.modules.get("torch")  # a process that never imported torch has no GPU memory to report
    if torch is None or not torch.cuda.is_initialized():
        return {}
    reading = {}
    for index in range(torch.cuda.device_count()):
        reserved = torch.cuda.memory_reserved(index)
        if reserved:
            total = torch.cuda.get_device_properties(index).total_memory
            reading[f"cuda:{index}"] = (torch.cuda.memory_allocated(index), reserved, total)
    return reading


class GpuMemoryCollector:
    """nextstep:gpu_memory_* gauges, one sample per device, read at scrape time."""

    def __init__(self, read: Callable[[], GpuMemoryReading] = cuda_memory_in_use):
        self.read = read

    def describe(self) -> list[GaugeMetricFamily]:
        return self._families({})

    def collect(self) -> list[GaugeMetricFamily]:
        return self._families(self.read())

    @staticmethod
    def _families(reading: GpuMemoryReading) -> list[GaugeMetricFamily]:
        families = [
            GaugeMetricFamily("nextstep:gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"]),
            GaugeMetricFamily(
                "nextstep:gpu_memory_reserved_bytes",
                "GPU memory held by the caching allocator (weights, KV cache, graphs, free blocks)",
                labels=["device"],
            ),
            GaugeMetricFamily("nextstep:gpu_memory_total_bytes", "GPU memory of the device", labels=["device"]),
        ]
        for device, values in sorted(reading.items()):
            for family, value in zip(families, values):
                family.add_metric([device], value)
        return families


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
        for reason in JOB_FAILURE_REASONS:
            self.job_failures.labels(reason=reason)
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
        # GPU memory of a worker on CUDA; no samples elsewhere
        self.gpu_memory = GpuMemoryCollector()
        r.register(self.gpu_memory)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
