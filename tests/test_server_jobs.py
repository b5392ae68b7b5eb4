"""Jobs and events survive JSON (the Redis wire format); anything malformed is a JobFormatError; the local queue."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from server.jobs import FailedEvent, JobFormatError, JobSpec, PreviewEvent, ResultEvent, event_from_json, event_to_json
from server.queue_local import LocalQueue
from server.queues import QueueFullError
from tests.conftest import make_job


def job(job_id="j1", **fields):
    return make_job(job_id, **{"width": 64, "n": 2, "seed": 2**63 + 5, **fields})


def test_job_round_trips_through_json():
    spec = job(negative_prompt="blurry", partial_images=3, output_format="webp", output_compression=40)
    assert JobSpec.from_json(spec.to_json()) == spec


def test_job_becomes_the_engine_request_it_describes():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    spec = job(prompt="<image>edit", image_b64=base64.b64encode(buffer.getvalue()).decode(), partial_images=2)
    request = spec.engine_request()
    assert request.request_id == "j1" and request.partial_images == 2
    generation = request.request
    assert (generation.width, generation.height, generation.n, generation.seed) == (64, 32, 2, 2**63 + 5)
    assert generation.params.num_steps == 2 and generation.image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "text",
    [b"not json", b"[1]", b'{"job_id": "x"}', job(width="64").to_json(), job(n=True).to_json(), b"\xff\xfe"],
)
def test_malformed_job_is_a_job_format_error(text):
    with pytest.raises(JobFormatError):
        JobSpec.from_json(text)


@pytest.mark.parametrize(
    "spec",
    [job(params={"sampler": "sde"}), job(image_b64="!!"), job(image_b64="aGVsbG8="), job(output_format="bmp")],
)
def test_job_that_cannot_be_rendered_raises_value_error(spec):
    with pytest.raises(ValueError):
        spec.engine_request()


@pytest.mark.parametrize(
    "event",
    [PreviewEvent(1, 2, "AAAA"), ResultEvent(["AA", "BB"], 5, 4, 8), FailedEvent("no", True, "invalid_request")],
)
def test_events_round_trip_through_json(event):
    assert event_from_json(event_to_json(event)) == event


@pytest.mark.parametrize("text", [b"{}", b'{"type": "party"}', b'{"type": "preview"}', b"nope"])
def test_malformed_event_is_a_job_format_error(text):
    with pytest.raises(JobFormatError):
        event_from_json(text)


def test_local_queue_answers_full_at_its_bound_and_frees_a_slot_when_a_job_finishes():
    async def scenario():
        queue = LocalQueue(max_jobs=2)
        await queue.submit(job("a"))
        await queue.submit(job("b"))
        with pytest.raises(QueueFullError):
            await queue.submit(job("c"))
        claimed = queue.claim(1, 0)
        queue.finish(claimed[0].job_id, FailedEvent("x", False))
        await queue.submit(job("c"))
        return await queue.depth()

    assert asyncio.run(scenario()) == 2


def test_local_queue_frees_the_slot_before_the_result_reaches_the_subscriber():
    # a client that sends its next request as soon as it hears the result must find the slot free
    async def scenario():
        queue = LocalQueue(max_jobs=1)
        await queue.submit(job("a"))
        subscription = queue.subscribe("a")
        depth_at_delivery = []
        deliver = subscription.put
        subscription.put = lambda event: (depth_at_delivery.append(len(queue._unfinished)), deliver(event))
        queue.finish(queue.claim(1, 0)[0].job_id, ResultEvent(["I"], 1, 0, 4))
        return depth_at_delivery

    assert asyncio.run(scenario()) == [0]


def test_local_queue_delivers_worker_events_to_the_subscriber():
    async def scenario():
        queue = LocalQueue(max_jobs=4)
        await queue.submit(job("a"))
        subscription = queue.subscribe("a")
        queue.publish("a", PreviewEvent(0, 0, "P"))
        queue.finish("a", ResultEvent(["I"], 1, 0, 4))
        return [await subscription.next(1.0), await subscription.next(1.0), await subscription.next(0.01)]

    assert asyncio.run(scenario()) == [PreviewEvent(0, 0, "P"), ResultEvent(["I"], 1, 0, 4), None]


def test_local_queue_cancel_removes_a_waiting_job_and_flags_a_claimed_one():
    async def scenario():
        queue = LocalQueue(max_jobs=4)
        for name in "ab":
            await queue.submit(job(name))
        claimed = queue.claim(1, 0)[0].job_id
        queue.cancel("b")  # still waiting: gone at once
        queue.cancel(claimed)  # claimed: the worker is told
        return claimed, queue.claim(4, 0), queue.cancelled({claimed}), await queue.depth()

    claimed, left, cancelled, depth = asyncio.run(scenario())
    assert claimed == "a" and left == [] and cancelled == {"a"} and depth == 1
