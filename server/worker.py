"""The worker: one engine in one thread, fed from a job queue, its events turned into stored results.

Loop: apply cancellations (engine.abort, always between steps, never concurrently with one), claim
jobs while the engine has few waiting, step the engine, refresh gauges. Events arrive from inside
step() and are encoded and published at once. A step that raises is the engine's fault, never a
reason to stop: the engine is rebuilt and the jobs that shared the step run again one at a time,
so only the job that crashes alone is failed.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from model.bundle import ModelBundle

from .engine.events import (
    Engine,
    EngineEvent,
    EventSink,
    ImageDone,
    ImagePreview,
    RequestDone,
    RequestFailed,
)
from .engine.engine import BatchedEngine
from .images import encode_image
from .jobs import FailedEvent, JobSpec, PreviewEvent, ResultEvent
from .metrics import ServerMetrics
from .queues import WorkerQueue

log = logging.getLogger(__name__)

IDLE_CLAIM_WAIT_S = 0.05
QUEUE_RETRY_S = 1.0


def make_engine(bundle: ModelBundle, on_event: EventSink) -> Engine:
    """The one place the engine class is chosen."""
    return BatchedEngine(bundle, on_event)


@dataclass
class ActiveJob:
    spec: JobSpec
    images: dict[int, str] = field(default_factory=dict)  # image index -> base64 file
    previewed: bool = False


class Worker:
    def __init__(
        self,
        queue: WorkerQueue,
        metrics: ServerMetrics,
        load_bundle: Callable[[], ModelBundle],
        engine_factory: Callable[[ModelBundle, EventSink], Engine] = make_engine,
        prefetch: int = 2,
    ):
        self.queue = queue
        self.metrics = metrics
        self.load_bundle = load_bundle
        self.engine_factory = engine_factory
        self.prefetch = prefetch
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.active: dict[str, ActiveJob] = {}
        self.suspects: deque[JobSpec] = deque()  # jobs of a crashed step, re-run one at a time
        self.images_this_step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nextstep-worker", daemon=True)
        self.bundle: ModelBundle | None = None
        self.engine: Engine | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self.load()
        except Exception as err:  # a model that fails to load leaves /ready at 503
            log.exception("worker could not load the model")
            self.load_error = str(err)
            return
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # e.g. the queue is unreachable: wait and try again
                log.exception("worker loop failed; retrying in %.0f s", QUEUE_RETRY_S)
                self._stop.wait(QUEUE_RETRY_S)

    def load(self) -> None:
        self.bundle = self.load_bundle()
        self.engine = self.engine_factory(self.bundle, self._on_event)
        self.ready.set()

    def run_once(self) -> None:
        """One turn of the loop: cancellations, admissions, one engine step, gauges."""
        self._abort_cancelled()
        self._admit_jobs()
        if self.engine.has_work():
            self._step()
        self._update_gauges()

    # admission

    def _admit_jobs(self) -> None:
        if self.suspects:
            if not self.engine.has_work():
                self._admit(self.suspects.popleft())
            return
        room = self.prefetch - self.engine.stats().waiting_requests
        if room <= 0:
            return
        block_s = 0.0 if self.engine.has_work() else IDLE_CLAIM_WAIT_S
        for spec in self.queue.claim(room, block_s):
            self.metrics.queue_time.observe(max(0.0, time.time() - spec.enqueued_at))
            self._admit(spec)

    def _admit(self, spec: JobSpec) -> None:
        if spec.deadline and time.time() > spec.deadline:
            self._fail(spec.job_id, "the request timed out before a worker could start it", False, "timeout")
            return
        try:
            request = spec.engine_request()
            self.active[spec.job_id] = ActiveJob(spec)
            self.engine.add_request(request)
        except ValueError as err:
            self.active.pop(spec.job_id, None)
            self._fail(spec.job_id, str(err), True, "invalid_request")

    def _abort_cancelled(self) -> None:
        for job_id in self.queue.cancelled(set(self.active) | {s.job_id for s in self.suspects}):
            if job_id in self.active:
                self.engine.abort(job_id)
                del self.active[job_id]
            self.suspects = deque(s for s in self.suspects if s.job_id != job_id)
            self.queue.drop(job_id)
            self.metrics.request_aborted.inc()

    # stepping

    def _step(self) -> None:
        self.images_this_step = 0
        started = time.perf_counter()
        try:
            self.engine.step()
        except Exception:  # an engine bug must not take the worker down
            log.exception("engine step failed with %d active job(s); rebuilding the engine", len(self.active))
            self._recover_from_crash()
            return
        self.metrics.step_duration.observe(time.perf_counter() - started)
        images = self.images_this_step + self.engine.stats().running_images
        if images:
            self.metrics.batch_size.observe(images)

    def _recover_from_crash(self) -> None:
        crashed = [job.spec for job in self.active.values()]
        self.active.clear()
        self.engine = self.engine_factory(self.bundle, self._on_event)
        if len(crashed) == 1:  # it ran alone, so it is the cause
            self._fail(crashed[0].job_id, "the engine failed while rendering this request", False, "engine_error")
        else:
            self.suspects.extend(crashed)

    def _update_gauges(self) -> None:
        stats = self.engine.stats()
        self.metrics.requests_waiting.set(stats.waiting_requests)
        self.metrics.requests_running.set(max(0, len(self.active) - stats.waiting_requests))
        self.metrics.images_running.set(stats.running_images)
        self.metrics.kv_cache_usage.set(stats.kv_cache_usage)
        self.metrics.prefix_cache_hit_rate.set(stats.prefix_cache_hit_rate)

    # events (called from inside engine.step())

    def _on_event(self, event: EngineEvent) -> None:
        job = self.active.get(event.request_id)
        if job is None:  # cancelled meanwhile
            return
        try:
            self._handle_event(job, event)
        except Exception:  # never let publishing (e.g. Redis down) break the engine's step
            log.exception("could not publish %s of job %s", type(event).__name__, event.request_id)

    def _handle_event(self, job: ActiveJob, event: EngineEvent) -> None:
        spec = job.spec
        if isinstance(event, ImagePreview):
            if not job.previewed:
                job.previewed = True
                self.metrics.time_to_first_preview.observe(max(0.0, time.time() - spec.enqueued_at))
            data = encode_image(event.pixels, spec.output_format, spec.output_compression)
            self.queue.publish(spec.job_id, PreviewEvent(event.image_index, event.preview_index, _b64(data)))
        elif isinstance(event, ImageDone):
            self.images_this_step += 1
            job.images[event.image_index] = _b64(
                encode_image(event.pixels, spec.output_format, spec.output_compression)
            )
        elif isinstance(event, RequestDone):
            del self.active[spec.job_id]
            if sorted(job.images) != list(range(spec.n)):
                self._fail(
                    spec.job_id, f"the engine returned {len(job.images)} of {spec.n} images", False, "engine_error"
                )
                return
            images = [job.images[i] for i in range(spec.n)]
            self.queue.finish(
                spec.job_id, ResultEvent(images, spec.text_tokens, spec.input_image_tokens, event.image_tokens)
            )
            self.metrics.request_success.inc()
            self.metrics.images.inc(spec.n)
            self.metrics.image_tokens.inc(event.image_tokens)
            self.metrics.prompt_tokens.inc(event.prompt_tokens)
            self.metrics.e2e_latency.observe(max(0.0, time.time() - spec.enqueued_at))
        elif isinstance(event, RequestFailed):
            del self.active[spec.job_id]
            code = "invalid_request" if event.client_error else "engine_error"
            self._fail(spec.job_id, event.message, event.client_error, code)

    def _fail(self, job_id: str, message: str, client_error: bool, code: str) -> None:
        self.queue.finish(job_id, FailedEvent(message, client_error, code))
        self.metrics.job_failures.labels(reason=code).inc()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
