"""Everything a server process runs, built from Settings: the queue sides, the image store, the worker."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from model.bundle import ModelBundle

from .auth import ApiKeyCheck
from .config import Settings
from .image_store import LocalImageStore, RedisImageStore
from .metrics import ServerMetrics
from .queue_local import LocalQueue
from .queues import ApiQueue
from .served_model import ServedModel, load_model_bundle, load_served_model
from .worker import Worker


@dataclass
class Services:
    settings: Settings
    metrics: ServerMetrics
    check_api_key: ApiKeyCheck
    served: ServedModel | None = None  # API roles only
    queue: ApiQueue | None = None  # API roles only
    store: LocalImageStore | RedisImageStore | None = None  # API roles only
    worker: Worker | None = None  # worker roles only
    redis_worker_queue: object | None = None  # the worker's side in Redis mode, closed on shutdown

    async def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.queue is not None:
            await self.queue.close()
        if self.redis_worker_queue is not None:
            self.redis_worker_queue.close()


def build_services(settings: Settings, load_bundle: Callable[[], ModelBundle] | None = None) -> Services:
    """`load_bundle` overrides how the worker gets its model (tests share one loaded bundle)."""
    metrics = ServerMetrics()
    services = Services(settings, metrics, ApiKeyCheck(settings.api_keys))
    serves_api = settings.role in ("both", "api")
    runs_worker = settings.role in ("both", "worker")
    if settings.redis_url is None:  # role "both": one LocalQueue is both sides
        services.queue = worker_queue = LocalQueue(settings.max_queued_jobs)
        services.store = LocalImageStore(settings.url_ttl_s)
    else:
        from .queue_redis import RedisApiQueue, RedisWorkerQueue  # redis is an optional dependency

        if serves_api:
            services.queue = RedisApiQueue(
                settings.redis_url, settings.redis_prefix, settings.max_queued_jobs, settings.url_ttl_s
            )
            services.store = RedisImageStore(services.queue.client, settings.redis_prefix, settings.url_ttl_s)
        if runs_worker:
            services.redis_worker_queue = worker_queue = RedisWorkerQueue(
                settings.redis_url,
                settings.redis_prefix,
                settings.worker_name or f"{socket.gethostname()}-{os.getpid()}",
                settings.claim_idle_s,
                settings.max_deliveries,
                settings.url_ttl_s,
                metrics,
            )
    if serves_api:
        services.served = load_served_model(settings)
    if runs_worker:
        services.worker = Worker(
            worker_queue,
            metrics,
            load_bundle or (lambda: load_model_bundle(settings)),
            prefetch=settings.worker_prefetch,
        )
    return services
