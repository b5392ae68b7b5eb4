"""The two sides of a job queue; queue_local.py and queue_redis.py implement both.

The API side is asyncio (it lives in the web server's loop); the worker side is blocking and is
called from the worker's own thread. A job is finished exactly once, by `finish` (its result or
failure is stored, then the job acknowledged) or `drop` (cancelled, nothing stored).
"""

from __future__ import annotations

from typing import Protocol

from .jobs import FailedEvent, JobEvent, JobSpec, PreviewEvent, ResultEvent


class QueueFullError(Exception):
    """The queue holds its bound of unfinished jobs; the client should retry later."""


class QueueUnavailableError(Exception):
    """The queue cannot be reached (e.g. Redis is down)."""


class Subscription(Protocol):
    async def next(self, timeout_s: float) -> JobEvent | None:
        """The job's next event, or None when none came within timeout_s."""

    def close(self) -> None: ...


class ApiQueue(Protocol):
    async def submit(self, spec: JobSpec) -> None:
        """Enqueue, or raise QueueFullError or QueueUnavailableError."""

    def subscribe(self, job_id: str) -> Subscription: ...

    def cancel(self, job_id: str) -> None:
        """Ask the workers to drop the job; returns at once."""

    async def depth(self) -> int:
        """Jobs accepted and not finished."""

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class WorkerQueue(Protocol):
    def claim(self, max_jobs: int, block_s: float) -> list[JobSpec]:
        """Up to max_jobs new jobs, waiting at most block_s for the first."""

    def publish(self, job_id: str, event: PreviewEvent) -> None: ...

    def finish(self, job_id: str, event: ResultEvent | FailedEvent) -> None:
        """Store the job's terminal event, then acknowledge the job."""

    def drop(self, job_id: str) -> None:
        """Acknowledge a cancelled job without a result."""

    def cancelled(self, job_ids: set[str]) -> set[str]:
        """Which of job_ids clients have cancelled since the last call."""
