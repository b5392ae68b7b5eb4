"""The Redis Streams backend against a real redis-server the tests start: claiming, reclaiming from dead
workers, exactly-once results, the dead-letter stream, cancellations, and API replicas sharing results."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from server.jobs import FailedEvent, JobSpec, PreviewEvent, ResultEvent, event_from_json
from server.metrics import ServerMetrics
from server.queues import QueueFullError
from tests.conftest import free_port, make_job, metric, wait_until

redis = pytest.importorskip("redis")
from server.queue_redis import GROUP, RedisApiQueue, RedisKeys, RedisWorkerQueue

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prefix():
    return f"test-{uuid.uuid4().hex[:8]}"


def worker_queue(redis_url, prefix, consumer, claim_idle_s=60.0, max_deliveries=3) -> RedisWorkerQueue:
    return RedisWorkerQueue(redis_url, prefix, consumer, claim_idle_s, max_deliveries, 600, ServerMetrics())


def submit(redis_url, prefix, *specs, max_jobs=100):
    async def go():
        queue = RedisApiQueue(redis_url, prefix, max_jobs, 600)
        try:
            for spec in specs:
                await queue.submit(spec)
        finally:
            await queue.close()

    asyncio.run(go())


def stored_events(client, keys: RedisKeys, job_id: str):
    return [event_from_json(fields[b"event"]) for _, fields in client.xrange(keys.events(job_id))]


# queue semantics, in-process


def test_enqueue_beyond_the_bound_is_refused(redis_url, prefix):
    submit(redis_url, prefix, make_job("a"), max_jobs=1)
    with pytest.raises(QueueFullError):
        submit(redis_url, prefix, make_job("b"), max_jobs=1)


def test_finish_stores_the_result_once_and_acknowledges(redis_url, prefix):
    submit(redis_url, prefix, make_job("a"))
    first, second = worker_queue(redis_url, prefix, "w1", claim_idle_s=0.05), worker_queue(redis_url, prefix, "w2")
    try:
        assert [spec.job_id for spec in first.claim(4, 0)] == ["a"]
        first.publish("a", PreviewEvent(0, 0, "P"))
        first.finish("a", ResultEvent(["I"], 1, 0, 4))
        first.finish("a", ResultEvent(["again"], 1, 0, 4))  # a re-run's result is not stored twice
        client = redis.Redis.from_url(redis_url)
        assert stored_events(client, RedisKeys(prefix), "a") == [PreviewEvent(0, 0, "P"), ResultEvent(["I"], 1, 0, 4)]
        assert (
            client.xlen(RedisKeys(prefix).jobs) == 0 and client.xpending(RedisKeys(prefix).jobs, GROUP)["pending"] == 0
        )
        assert second.claim(4, 0) == []
    finally:
        first.close()
        second.close()


def test_job_of_a_silent_worker_is_reclaimed_and_after_max_deliveries_dead_lettered(redis_url, prefix):
    submit(redis_url, prefix, make_job("poison"))
    keys, client = RedisKeys(prefix), redis.Redis.from_url(redis_url)
    claimed_by = []
    for consumer in ("w1", "w2", "w3"):
        queue = worker_queue(redis_url, prefix, consumer, claim_idle_s=0.05, max_deliveries=2)
        time.sleep(0.1)  # the previous holder went silent
        claimed_by += [consumer for _ in queue.claim(1, 0)]
        queue.close()  # dies holding the job: no finish, no heartbeat
    assert claimed_by == ["w1", "w2"]  # the third delivery exceeds max_deliveries=2
    dead = client.xrange(keys.dead)
    assert len(dead) == 1 and b"delivered 3 times" in dead[0][1][b"reason"]
    assert JobSpec.from_json(dead[0][1][b"job"]).job_id == "poison"
    failure = stored_events(client, keys, "poison")[-1]
    assert isinstance(failure, FailedEvent) and failure.code == "dead_letter" and not failure.client_error
    assert client.xlen(keys.jobs) == 0


def test_unparseable_job_goes_straight_to_the_dead_letter_stream(redis_url, prefix):
    keys, client = RedisKeys(prefix), redis.Redis.from_url(redis_url)
    queue = worker_queue(redis_url, prefix, "w1")
    try:
        client.xadd(keys.jobs, {"job": b"{not json"})
        submit(redis_url, prefix, make_job("fine"))
        assert [spec.job_id for spec in queue.claim(4, 0)] == ["fine"]
        assert [fields[b"job"] for _, fields in client.xrange(keys.dead)] == [b"{not json"]
    finally:
        queue.close()


def test_cancellations_reach_workers_and_cancelled_jobs_are_never_claimed(redis_url, prefix):
    submit(redis_url, prefix, make_job("running"))
    queue = worker_queue(redis_url, prefix, "w1")

    async def cancel(*job_ids):
        api = RedisApiQueue(redis_url, prefix, 100, 600)
        for job_id in job_ids:
            api.cancel(job_id)
        await api.close()

    try:
        assert [spec.job_id for spec in queue.claim(4, 0)] == ["running"]
        submit(redis_url, prefix, make_job("queued"))
        asyncio.run(cancel("running", "queued"))
        assert queue.cancelled({"running", "other"}) == {"running"}
        assert queue.claim(4, 0) == []  # "queued" was cancelled before anyone claimed it
    finally:
        queue.close()


def test_any_api_replica_can_follow_a_job_another_one_enqueued(redis_url, prefix):
    submit(redis_url, prefix, make_job("a", partial_images=1))
    queue = worker_queue(redis_url, prefix, "w1")
    queue.claim(1, 0)
    queue.publish("a", PreviewEvent(0, 0, "P"))
    queue.publish("a", PreviewEvent(0, 0, "P"))  # a re-run repeats its previews; readers skip them
    queue.finish("a", ResultEvent(["I"], 1, 0, 4))
    queue.close()

    async def follow():
        other_replica = RedisApiQueue(redis_url, prefix, 100, 600)
        subscription = other_replica.subscribe("a")
        events = [await subscription.next(1.0) for _ in range(3)]
        await other_replica.close()
        return events

    assert asyncio.run(follow()) == [PreviewEvent(0, 0, "P"), ResultEvent(["I"], 1, 0, 4), None]


# live processes


def start_worker(redis_url, prefix, name) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "server", "--role", "worker", "--redis-url", redis_url, "--redis-prefix", prefix,
               "--worker-name", name, "--port", str(port), "--claim-idle", "1", "--log-level", "warning"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO), f"http://127.0.0.1:{port}"


def is_ready(url) -> bool:
    try:
        return httpx.get(f"{url}/ready").status_code == 200
    except httpx.TransportError:
        return False


def test_api_replicas_and_two_worker_processes_one_killed_mid_make_job(start_server, redis_url, prefix):
    """Every job completes exactly once; a url from one replica downloads from another; workers serve /metrics."""
    workers = [start_worker(redis_url, prefix, name) for name in ("wA", "wB")]
    try:
        for process, url in workers:
            wait_until(lambda url=url: is_ready(url), timeout_s=60, what="a worker process to load the model")
        replicas = [start_server(role="api", redis_url=redis_url, redis_prefix=prefix, max_pixels=64 * 64)
                    for _ in range(2)]  # fmt: skip
        with replicas[0] as first, replicas[1] as second:
            responses = []
            body = {"prompt": "survive", "size": "64x64", "num_inference_steps": 12, "response_format": "url"}

            def client():
                responses.append(httpx.post(f"{first.url}/v1/images/generations", json=body, timeout=120))

            threads = [threading.Thread(target=client) for _ in range(4)]
            for thread in threads:
                thread.start()
            keys, client_redis = RedisKeys(prefix), redis.Redis.from_url(redis_url)
            wait_until(
                lambda: client_redis.xpending_range(keys.jobs, GROUP, "-", "+", 10, consumername="wA"),
                timeout_s=60, what="worker A to hold a job",
            )  # fmt: skip
            workers[0][0].send_signal(signal.SIGKILL)
            for thread in threads:
                thread.join(timeout=120)

            assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
            for response in responses:
                terminal = [e for e in stored_events(client_redis, keys, response.headers["x-request-id"])
                            if not isinstance(e, PreviewEvent)]  # fmt: skip
                assert len(terminal) == 1 and isinstance(terminal[0], ResultEvent)
            assert client_redis.xlen(keys.jobs) == 0 and client_redis.xlen(keys.dead) == 0

            image_url = responses[0].json()["data"][0]["url"]
            download = httpx.get(image_url.replace(first.url, second.url))
            assert download.status_code == 200 and download.headers["content-type"] == "image/png"
            assert metric(workers[1][1], "nextstep:request_success_total") >= 1
            assert metric(first.url, "nextstep:http_requests_total", status="200", route="/v1/images/generations") == 4
    finally:
        for process, _ in workers:
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=30)
