"""The worker against the Engine protocol: a scripted engine and a recording queue, no HTTP, no model."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from server.engine.events import EngineStats, ImageDone, ImagePreview, RequestDone, RequestFailed, preview_points
from server.jobs import FailedEvent, PreviewEvent, ResultEvent
from server.metrics import ServerMetrics
from server.worker import Worker
from tests.conftest import make_job

TOKENS = 3  # every fake request takes this many steps


class ScriptedEngine:
    """Advances every request one token per step; prompt 'crash' makes a step raise, 'reject' fails it."""

    def __init__(self, bundle, on_event):
        self.on_event = on_event
        self.requests = {}  # id -> [EngineRequest, tokens done]
        self.aborted = []
        self.steps = 0

    def add_request(self, request):
        self.requests[request.request_id] = [request, 0]

    def abort(self, request_id):
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def has_work(self):
        return bool(self.requests)

    def stats(self):
        return EngineStats(sum(r.request.n for r, _ in self.requests.values()), 0, 0.5, 0.25, self.steps)

    def step(self):
        self.steps += 1
        for request_id, entry in list(self.requests.items()):
            request, done = entry[0], entry[1] + 1
            entry[1] = done
            if request.request.prompt == "crash":
                raise RuntimeError("engine bug")
            if request.request.prompt == "reject":
                del self.requests[request_id]
                self.on_event(RequestFailed(request_id, "cannot draw that", client_error=True))
                continue
            points = preview_points(request.partial_images, TOKENS)
            for i in range(request.request.n):
                pixels = np.full((16, 16, 3), 10 * i + done, dtype=np.uint8)
                if done in points:
                    self.on_event(ImagePreview(request_id, i, points.index(done), done, TOKENS, pixels))
                if done == TOKENS:
                    self.on_event(ImageDone(request_id, i, pixels))
            if done == TOKENS:
                del self.requests[request_id]
                self.on_event(RequestDone(request_id, prompt_tokens=7, image_tokens=TOKENS * request.request.n))


class RecordingQueue:
    def __init__(self, jobs=()):
        self.waiting = list(jobs)
        self.published, self.finished, self.dropped = [], {}, []
        self.to_cancel = set()

    def claim(self, max_jobs, block_s):
        jobs, self.waiting = self.waiting[:max_jobs], self.waiting[max_jobs:]
        return jobs

    def publish(self, job_id, event):
        self.published.append((job_id, event))

    def finish(self, job_id, event):
        assert job_id not in self.finished, "a job must finish exactly once"
        self.finished[job_id] = event

    def drop(self, job_id):
        self.dropped.append(job_id)

    def cancelled(self, job_ids):
        hits = self.to_cancel & job_ids
        self.to_cancel -= hits
        return hits


def job(job_id, prompt="a cat", n=1, **fields):
    return make_job(job_id, prompt=prompt, n=n, text_tokens=5, **fields)


def make_worker(queue, prefetch=2):
    worker = Worker(queue, ServerMetrics(), load_bundle=lambda: None, engine_factory=ScriptedEngine, prefetch=prefetch)
    worker.load()
    return worker


def run_until_idle(worker, queue, limit=100):
    for _ in range(limit):
        worker.run_once()
        if not queue.waiting and not worker.active and not worker.suspects:
            return
    raise AssertionError("the worker did not finish its jobs")


def counter(worker, name, **labels) -> float:
    return worker.metrics.registry.get_sample_value(name, labels or None) or 0.0


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_finished_job_stores_every_image_in_its_format_with_usage():
    queue = RecordingQueue([job("a", n=2, output_format="jpeg", input_image_tokens=0)])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    result = queue.finished["a"]
    assert isinstance(result, ResultEvent) and len(result.images) == 2
    assert [decode(b).format for b in result.images] == ["JPEG", "JPEG"]
    assert np.asarray(decode(result.images[1]))[0, 0, 0] == pytest.approx(10 + TOKENS, abs=2)
    assert (result.text_tokens, result.input_image_tokens, result.output_tokens) == (5, 0, 2 * TOKENS)


def test_metrics_count_what_the_engine_did():
    queue = RecordingQueue([job("a", n=2), job("b", n=1)])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    assert counter(worker, "nextstep:request_success_total") == 2
    assert counter(worker, "nextstep:images_generated_total") == 3
    assert counter(worker, "nextstep:image_tokens_total") == 3 * TOKENS
    assert counter(worker, "nextstep:prompt_tokens_total") == 14
    assert counter(worker, "nextstep:e2e_request_latency_seconds_count") == 2
    assert counter(worker, "nextstep:step_duration_seconds_count") == TOKENS
    assert counter(worker, "nextstep:kv_cache_usage_perc") == 0.5


def test_previews_are_published_in_order_while_rendering():
    queue = RecordingQueue([job("a", n=2, partial_images=2)])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    previews = [event for job_id, event in queue.published]
    assert all(isinstance(e, PreviewEvent) for e in previews)
    assert [(e.image_index, e.partial_index) for e in previews] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert counter(worker, "nextstep:time_to_first_preview_seconds_count") == 1


def test_cancelled_job_is_aborted_in_the_engine_and_dropped_while_others_finish():
    queue = RecordingQueue([job("a"), job("b")])
    worker = make_worker(queue)
    worker.run_once()  # both admitted, one token done
    queue.to_cancel.add("a")
    run_until_idle(worker, queue)
    assert worker.engine.aborted == ["a"] and queue.dropped == ["a"]
    assert list(queue.finished) == ["b"]
    assert counter(worker, "nextstep:request_aborted_total") == 1


def test_malformed_job_fails_as_client_error_without_reaching_the_engine():
    params = dict(job("x").params, sampler="euler")
    queue = RecordingQueue([job("bad", params=params), job("good")])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    failure = queue.finished["bad"]
    assert isinstance(failure, FailedEvent) and failure.client_error and "sampler" in failure.message
    assert isinstance(queue.finished["good"], ResultEvent)


def test_job_past_its_deadline_fails_with_timeout():
    queue = RecordingQueue([job("late", deadline=time.time() - 1)])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    assert queue.finished["late"].code == "timeout" and not queue.finished["late"].client_error


def test_engine_reported_failure_becomes_a_client_error():
    queue = RecordingQueue([job("r", prompt="reject")])
    worker = make_worker(queue)
    run_until_idle(worker, queue)
    assert queue.finished["r"] == FailedEvent("cannot draw that", True, "invalid_request")
    assert counter(worker, "nextstep:job_failures_total", reason="invalid_request") == 1


def test_engine_crash_fails_only_the_job_that_crashes_alone():
    queue = RecordingQueue([job("a"), job("boom", prompt="crash"), job("c")])
    worker = make_worker(queue, prefetch=3)
    run_until_idle(worker, queue)
    assert isinstance(queue.finished["a"], ResultEvent) and isinstance(queue.finished["c"], ResultEvent)
    failure = queue.finished["boom"]
    assert isinstance(failure, FailedEvent) and not failure.client_error and failure.code == "engine_error"


def test_worker_keeps_at_most_prefetch_jobs_waiting_in_the_engine():
    class SlowAdmission(ScriptedEngine):
        def stats(self):
            return EngineStats(0, len(self.requests), 0.0, 0.0, self.steps)

    queue = RecordingQueue([job(str(i)) for i in range(5)])
    worker = Worker(queue, ServerMetrics(), lambda: None, engine_factory=SlowAdmission, prefetch=2)
    worker.load()
    worker._admit_jobs()
    worker._admit_jobs()
    assert len(worker.engine.requests) == 2 and len(queue.waiting) == 3


def test_worker_thread_reports_a_model_that_fails_to_load():
    def broken():
        raise OSError("no such checkpoint")

    worker = Worker(RecordingQueue(), ServerMetrics(), broken)
    worker.start()
    worker.stop()
    assert worker.load_error == "no such checkpoint" and not worker.ready.is_set()
