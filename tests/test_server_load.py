"""A bounded loopback load test: concurrent clients, no errors under the queue bound, 429s over it,
every accepted request answered with its images, and metrics that add up to what the clients saw."""

from __future__ import annotations

import threading
from collections import Counter

import httpx

from tests.conftest import metric

BOUND = 4


def fire(url: str, clients: int, requests_each: int, body: dict) -> list[httpx.Response]:
    """`clients` threads start together and each sends `requests_each` requests one after another."""
    start = threading.Barrier(clients)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=120) as http:
            start.wait()
            for _ in range(requests_each):
                response = http.post("/v1/images/generations", json=body)
                with lock:
                    responses.append(response)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(responses) == clients * requests_each
    return responses


def test_load_under_and_over_the_queue_bound(start_server):
    with start_server(max_queued_jobs=BOUND, max_pixels=64 * 64) as live:
        under = fire(live.url, BOUND, 3, {"prompt": "under", "size": "32x32", "num_inference_steps": 2, "n": 2})
        assert Counter(r.status_code for r in under) == {200: BOUND * 3}
        assert all(len(r.json()["data"]) == 2 for r in under)

        over = fire(live.url, 3 * BOUND, 1, {"prompt": "over", "size": "64x64", "num_inference_steps": 8})
        statuses = Counter(r.status_code for r in over)
        assert set(statuses) <= {200, 429} and statuses[429] >= 1 and statuses[200] >= BOUND
        assert all(len(r.json()["data"]) == 1 for r in over if r.status_code == 200)
        assert all(r.headers["retry-after"] for r in over if r.status_code == 429)

        successes = len(under) + statuses[200]
        assert metric(live.url, "nextstep:request_success_total") == successes
        assert metric(live.url, "nextstep:images_generated_total") == 2 * len(under) + statuses[200]
        assert metric(live.url, "nextstep:image_tokens_total") == 2 * 4 * len(under) + 16 * statuses[200]
        assert metric(live.url, "nextstep:request_errors_total", reason="queue_full") == statuses[429]
        route = "/v1/images/generations"
        assert metric(live.url, "nextstep:http_requests_total", route=route, status="200") == successes
        assert metric(live.url, "nextstep:http_requests_total", route=route, status="429") == statuses[429]
        assert metric(live.url, "nextstep:e2e_request_latency_seconds_count") == successes
        assert metric(live.url, "nextstep:queue_depth") == 0
        assert metric(live.url, "nextstep:num_requests_running") == 0
