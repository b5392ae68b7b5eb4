"""The in-process job queue: API and worker in one process, events handed to the API's event loop."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from .jobs import FailedEvent, JobEvent, JobSpec, PreviewEvent, ResultEvent
from .queues import QueueFullError


class LocalSubscription:
    """The events of one job, delivered from the worker thread into the API's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_close):
        self._loop = loop
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._on_close = on_close

    def put(self, event: JobEvent) -> None:
        """Called from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
            pass

    async def next(self, timeout_s: float) -> JobEvent | None:
        try:
            return await asyncio.wait_for(self._events.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        self._on_close()


class LocalQueue:
    """Both queue sides in one object; at most `max_jobs` jobs are unfinished at once."""

    def __init__(self, max_jobs: int):
        self.max_jobs = max_jobs
        self._lock = threading.Condition()
        self._waiting: deque[JobSpec] = deque()
        self._unfinished: set[str] = set()
        self._cancelled: set[str] = set()
        self._subscriptions: dict[str, LocalSubscription] = {}
        self._closed = False

    # API side

    async def submit(self, spec: JobSpec) -> None:
        subscription = LocalSubscription(asyncio.get_running_loop(), lambda: self._forget(spec.job_id))
        with self._lock:
            if len(self._unfinished) >= self.max_jobs:
                raise QueueFullError(f"{len(self._unfinished)} jobs are queued or running; retry later")
            self._subscriptions[spec.job_id] = subscription
            self._unfinished.add(spec.job_id)
            self._waiting.append(spec)
            self._lock.notify()

    def subscribe(self, job_id: str) -> LocalSubscription:
        with self._lock:
            return self._subscriptions[job_id]

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._subscriptions.pop(job_id, None)
            if job_id not in self._unfinished:
                return
            for spec in self._waiting:
                if spec.job_id == job_id:  # never claimed: no worker needs to know
                    self._waiting.remove(spec)
                    self._unfinished.discard(job_id)
                    return
            self._cancelled.add(job_id)

    async def depth(self) -> int:
        with self._lock:
            return len(self._unfinished)

    async def ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._subscriptions.pop(job_id, None)

    # worker side

    def claim(self, max_jobs: int, block_s: float) -> list[JobSpec]:
        with self._lock:
            if not self._waiting and block_s > 0:
                self._lock.wait_for(lambda: self._waiting or self._closed, timeout=block_s)
            jobs = []
            while self._waiting and len(jobs) < max_jobs:
                jobs.append(self._waiting.popleft())
            return jobs

    def publish(self, job_id: str, event: PreviewEvent) -> None:
        self._deliver(job_id, event)

    def finish(self, job_id: str, event: ResultEvent | FailedEvent) -> None:
        # the slot frees before the result goes out: a client that sends its next request on hearing
        # it must find room (seen as a 429 under the bound when the worker thread was slow to drop)
        self.drop(job_id)
        self._deliver(job_id, event)
        self._forget(job_id)  # the subscriber holds its subscription; nothing else may need it

    def drop(self, job_id: str) -> None:
        with self._lock:
            self._unfinished.discard(job_id)
            self._cancelled.discard(job_id)

    def cancelled(self, job_ids: set[str]) -> set[str]:
        with self._lock:
            hits = self._cancelled & job_ids
            self._cancelled -= hits
            return hits

    def _deliver(self, job_id: str, event: JobEvent) -> None:
        with self._lock:
            subscription = self._subscriptions.get(job_id)
        if subscription is not None:
            subscription.put(event)
