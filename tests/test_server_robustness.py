"""Overload, timeouts and vanishing clients: clear answers, cancelled jobs, and a server that keeps serving."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import metric, wait_until

QUICK = {"prompt": "a red circle", "size": "32x32", "num_inference_steps": 2}
SLOW = {"prompt": "a slow one", "size": "64x64", "num_inference_steps": 40}  # 16 tokens x 40 steps: about a second


def in_background(url: str, body: dict) -> tuple[threading.Thread, list]:
    responses = []
    thread = threading.Thread(
        target=lambda: responses.append(httpx.post(f"{url}/v1/images/generations", json=body, timeout=120))
    )
    thread.start()
    return thread, responses


def test_full_queue_answers_429_with_retry_after(start_server):
    with start_server(max_queued_jobs=1, retry_after_s=7, max_pixels=64 * 64) as live:
        thread, responses = in_background(live.url, SLOW)
        wait_until(lambda: metric(live.url, "nextstep:queue_depth") == 1, what="the slow job to be queued")
        response = httpx.post(f"{live.url}/v1/images/generations", json=QUICK)
        thread.join()
        assert response.status_code == 429 and response.headers["retry-after"] == "7"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert responses[0].status_code == 200
        assert httpx.post(f"{live.url}/v1/images/generations", json=QUICK).status_code == 200


def test_request_past_its_timeout_is_504_and_its_job_cancelled(start_server):
    with start_server(request_timeout_s=0.3, max_pixels=64 * 64) as live:
        response = httpx.post(f"{live.url}/v1/images/generations", json=SLOW, timeout=60)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert metric(live.url, "nextstep:request_cancellations_total", reason="timeout") == 1
        wait_until(lambda: metric(live.url, "nextstep:queue_depth") == 0, what="the worker to finish the job")
        assert httpx.post(f"{live.url}/v1/images/generations", json=QUICK).status_code == 200


def test_client_that_disconnects_cancels_its_job(start_server):
    with start_server(max_pixels=64 * 64) as live:
        thread, responses = in_background(live.url, SLOW)
        wait_until(lambda: metric(live.url, "nextstep:queue_depth") == 1, what="the slow job to be queued")
        with pytest.raises(httpx.ReadTimeout):
            # 200 steps (~5 s): far longer than the server takes to notice, even on a loaded machine
            abandoned = dict(SLOW, prompt="abandoned", num_inference_steps=200)
            httpx.post(f"{live.url}/v1/images/generations", json=abandoned, timeout=0.3)
        wait_until(
            lambda: metric(live.url, "nextstep:request_cancellations_total", reason="client_disconnect") == 1,
            what="the server to notice the disconnect",
        )
        thread.join()
        assert responses[0].status_code == 200
        wait_until(lambda: metric(live.url, "nextstep:queue_depth") == 0, what="the abandoned job to be dropped")
        assert metric(live.url, "nextstep:request_success_total") == 1  # the abandoned job never completed


def test_client_that_drops_a_stream_cancels_its_job_and_the_server_serves_on(start_server):
    with start_server(max_pixels=64 * 64) as live:
        body = dict(SLOW, stream=True, partial_images=3)
        with httpx.stream("POST", f"{live.url}/v1/images/generations", json=body, timeout=60) as stream:
            first = next(stream.iter_lines())
        assert first == "event: image_generation.partial_image"
        wait_until(
            lambda: metric(live.url, "nextstep:request_cancellations_total", reason="client_disconnect") == 1,
            what="the server to notice the dropped stream",
        )
        assert httpx.post(f"{live.url}/v1/images/generations", json=QUICK, timeout=60).status_code == 200
