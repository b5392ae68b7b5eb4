"""Job events -> what the client receives: one JSON ImagesResponse, or Server-Sent Events.

Waiting for a job watches two things besides its events: the request's deadline (504 and the job
cancelled) and the client's connection (the job cancelled, so its engine slot and KV blocks free up).

Streams: `<kind>.partial_image` per preview and one `<kind>.completed` per image, where kind is
image_generation or image_edit. With n > 1 every event carries `image_index` (an extension field):
previews and results of image i have image_index i. Each completed event's usage covers its own
image (output_tokens) and the shared prompt (input_tokens), so sum output_tokens, not input_tokens.
Errors after the stream started arrive as `event: error` with an OpenAI error body.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import Request

from .errors import ApiError
from .image_store import LocalImageStore
from .images import MIME_TYPES
from .jobs import FailedEvent, JobEvent, JobSpec, PreviewEvent, ResultEvent, is_terminal
from .metrics import ServerMetrics
from .queues import ApiQueue, Subscription
from .schemas import ImageData, ImagesResponse, InputTokensDetails, OutputTokensDetails, Usage

POLL_S = 0.25  # how often a waiting request checks its client is still connected


@dataclass(frozen=True)
class ResponseInfo:
    """What the response echoes back about the request."""

    created: int
    size: str
    quality: str
    output_format: str
    response_format: str
    stream_kind: str  # "image_generation" or "image_edit"
    background: str = "opaque"


def failure_error(event: FailedEvent) -> ApiError:
    if event.client_error:
        return ApiError(400, event.message, code=event.code)
    return ApiError(500, event.message, code=event.code or "server_error")


def job_events(
    queue: ApiQueue, job_id: str, request: Request, deadline: float, metrics: ServerMetrics
) -> AsyncIterator[JobEvent]:
    """The job's events up to its terminal one; cancels the job if the caller stops listening first.

    Subscribes now, before the caller's first iteration (a stream starts only when the response is sent).
    """
    return _follow(queue, queue.subscribe(job_id), job_id, request, deadline, metrics)


async def _follow(
    queue: ApiQueue, subscription: Subscription, job_id: str, request: Request, deadline: float, metrics: ServerMetrics
) -> AsyncIterator[JobEvent]:
    finished = False
    reason = "client_disconnect"
    try:
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                reason = "timeout"
                raise ApiError(504, "The request timed out before its images were ready.", code="timeout")
            event = await subscription.next(min(POLL_S, remaining))
            if event is None:
                if await request.is_disconnected():
                    return
                continue
            finished = is_terminal(event)
            yield event
            if finished:
                return
    finally:
        subscription.close()
        if not finished:
            queue.cancel(job_id)
            metrics.request_cancellations.labels(reason=reason).inc()


async def json_response(events: AsyncIterator[JobEvent], info: ResponseInfo, store, base_url: str) -> ImagesResponse:
    """Wait for the result and shape it as OpenAI's ImagesResponse (urls stored in `store`)."""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, FailedEvent):
                raise failure_error(event)
            if isinstance(event, ResultEvent):
                data = [await image_data(b64, info, store, base_url) for b64 in event.images]
                return ImagesResponse(
                    created=info.created,
                    data=data,
                    background=info.background,
                    output_format=info.output_format,
                    size=info.size,
                    quality=info.quality,
                    usage=usage(event, event.output_tokens),
                )
    raise ApiError(499, "The client closed the request.", code="client_disconnected")


async def image_data(b64: str, info: ResponseInfo, store: LocalImageStore, base_url: str) -> ImageData:
    if info.response_format != "url":
        return ImageData(b64_json=b64)
    file_id = await store.put(base64.b64decode(b64), MIME_TYPES[info.output_format])
    return ImageData(url=f"{base_url.rstrip('/')}/v1/images/files/{file_id}")


def usage(event: ResultEvent, output_tokens: int) -> Usage:
    input_tokens = event.text_tokens + event.input_image_tokens
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=input_tokens + output_tokens,
        input_tokens_details=InputTokensDetails(text_tokens=event.text_tokens, image_tokens=event.input_image_tokens),
        output_tokens_details=OutputTokensDetails(image_tokens=output_tokens),
    )


def sse(event_type: str, data: dict) -> str:
    return f"event: {event_type}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def sse_stream(
    events: AsyncIterator[JobEvent], spec: JobSpec, info: ResponseInfo, metrics: ServerMetrics
) -> AsyncIterator[str]:
    async with aclosing(events):
        try:
            async for event in events:
                for name, data in sse_events(event, spec, info):
                    yield sse(name, data)
        except ApiError as err:
            metrics.request_errors.labels(reason=err.code or str(err.status)).inc()
            yield sse("error", {"type": "error", **err.body()})


def sse_events(event: JobEvent, spec: JobSpec, info: ResponseInfo) -> list[tuple[str, dict]]:
    """(event name, data) of the SSE events one job event becomes; a failure raises its ApiError."""
    if isinstance(event, FailedEvent):
        raise failure_error(event)
    common = {
        "created_at": info.created,
        "size": info.size,
        "quality": info.quality,
        "background": info.background,
        "output_format": info.output_format,
    }
    if isinstance(event, PreviewEvent):
        name = f"{info.stream_kind}.partial_image"
        data = dict(type=name, b64_json=event.b64, **common, partial_image_index=event.partial_index)
        return [(name, dict(data, image_index=event.image_index))]
    name = f"{info.stream_kind}.completed"
    per_image = usage(event, event.output_tokens // max(1, spec.n)).model_dump()
    return [
        (name, dict(type=name, b64_json=b64, **common, image_index=index, usage=per_image))
        for index, b64 in enumerate(event.images)
    ]
