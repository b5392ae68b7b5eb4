"""HTTP routes: parse, validate into a job, enqueue, answer. The work lives in validation.py and results.py."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from .errors import ApiError, bad_request
from .jobs import JobSpec
from .queues import QueueFullError, QueueUnavailableError
from .results import ResponseInfo, job_events, json_response, sse_stream
from .schemas import (
    ErrorBody,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    edit_form_schema,
)
from .services import Services
from .validation import build_job

log = logging.getLogger(__name__)

FORM_FIELD_BYTES = 1 << 20
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
STARTED = int(time.time())
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 500, 503, 504)}
IMAGE_RESPONSES = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"},
    **ERRORS,
}

api_router = APIRouter(prefix="/v1")
ops_router = APIRouter()


def services(request: Request) -> Services:
    return request.app.state.services


def require_api_key(request: Request) -> None:
    services(request).check_api_key(request)


AUTH = [Depends(require_api_key)]


@api_router.get("/models", response_model=ModelList, dependencies=AUTH, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=services(request).served.model_id, created=STARTED)])


@api_router.get("/models/{model_id}", response_model=ModelCard, dependencies=AUTH, responses=ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    served = services(request).served
    if model_id != served.model_id:
        raise ApiError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
    return ModelCard(id=served.model_id, created=STARTED)


@api_router.post("/images/generations", response_model=ImagesResponse, dependencies=AUTH, responses=IMAGE_RESPONSES)
async def create_image(body: ImageGenerationRequest, request: Request):
    svc = services(request)
    spec = build_job(body, svc.served, svc.settings)
    return await run_job(svc, spec, body, request, "image_generation")


@api_router.post(
    "/images/edits",
    response_model=ImagesResponse,
    dependencies=AUTH,
    responses=IMAGE_RESPONSES,
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": edit_form_schema()}}}
    },
)
async def edit_image(request: Request):
    svc = services(request)
    body, image = await read_edit_form(request, svc.settings.max_upload_bytes)
    spec = build_job(body, svc.served, svc.settings, image)
    return await run_job(svc, spec, body, request, "image_edit")


@api_router.get("/images/files/{file_id}", responses={200: {"content": {"image/png": {}}}, **ERRORS})
async def image_file(file_id: str, request: Request) -> Response:
    """A `url` result; its id is unguessable, so like OpenAI's urls it needs no API key until it expires."""
    entry = await services(request).store.get(file_id)
    if entry is None:
        raise ApiError(404, "This image does not exist or has expired.", param="file_id", code="file_not_found")
    mime_type, data = entry
    return Response(data, media_type=mime_type)


@ops_router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@ops_router.get("/ready", responses={503: {"model": ErrorBody}})
async def ready(request: Request) -> dict:
    svc = services(request)
    worker = svc.worker
    if worker is not None and worker.load_error:
        raise ApiError(503, f"The model failed to load: {worker.load_error}", code="model_load_failed")
    if worker is not None and not (worker.ready.is_set() and worker.is_alive()):
        raise ApiError(503, "The model is still loading.", code="not_ready")
    if svc.queue is not None and not await svc.queue.ready():
        raise ApiError(503, "The job queue is unreachable.", code="queue_unavailable")
    return {"status": "ready"}


@ops_router.get("/metrics")
async def metrics(request: Request) -> Response:
    svc = services(request)
    if svc.queue is not None:
        svc.metrics.queue_depth.set(await svc.queue.depth())
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def read_edit_form(request: Request, max_upload_bytes: int) -> tuple[ImageEditRequest, bytes]:
    """The multipart edit form -> (its text fields, the one input image's bytes)."""
    if not request.headers.get("content-type", "").startswith(FORM_CONTENT_TYPES):
        raise bad_request(
            "Edits take multipart/form-data with an `image` file and a `prompt`.", None, "invalid_content_type"
        )
    fields: dict[str, str] = {}
    images: list[UploadFile] = []
    async with request.form(max_files=4, max_fields=64, max_part_size=FORM_FIELD_BYTES) as form:
        for key, value in form.multi_items():
            if key == "mask":
                raise bad_request(
                    "mask is not supported: NextStep edits the whole image by the instruction in the prompt.",
                    "mask", "unsupported_parameter",
                )  # fmt: skip
            if key in ("image", "image[]"):
                if not isinstance(value, UploadFile):
                    raise bad_request("image must be a file upload.", "image")
                images.append(value)
            elif isinstance(value, UploadFile):
                raise bad_request(f"Unrecognized file field: {key}", key, "unknown_parameter")
            elif key in fields:
                raise bad_request(f"{key} was given more than once.", key)
            else:
                fields[key] = value
        if len(images) != 1:
            message = "An input image is required." if not images else "The model takes exactly one input image."
            raise bad_request(message, "image", "missing_image" if not images else "too_many_images")
        image = await images[0].read(max_upload_bytes + 1)
    try:
        return ImageEditRequest.model_validate(fields), image
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from err


async def run_job(svc: Services, spec: JobSpec, body: ImageRequest, request: Request, stream_kind: str):
    try:
        await svc.queue.submit(spec)
    except QueueFullError as err:
        retry = str(svc.settings.retry_after_s)
        raise ApiError(429, f"The server is busy: {err}", code="queue_full", headers={"Retry-After": retry}) from err
    except QueueUnavailableError as err:
        raise ApiError(503, f"The job queue is unavailable: {err}", code="queue_unavailable") from err
    log.info(
        "job %s: %s %s n=%d user=%r", spec.job_id, stream_kind, spec.size, spec.n, body.user or body.safety_identifier
    )
    info = ResponseInfo(
        created=int(time.time()),
        size=spec.size,
        quality=body.quality or "auto",
        output_format=spec.output_format,
        response_format=body.response_format or "b64_json",
        stream_kind=stream_kind,
    )
    events = job_events(svc.queue, spec.job_id, request, spec.deadline, svc.metrics)
    headers = {"x-request-id": spec.job_id}
    if body.stream:
        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return StreamingResponse(
            sse_stream(events, spec, info, svc.metrics), media_type="text/event-stream", headers=headers
        )
    base_url = svc.settings.public_url or str(request.base_url)
    result = await json_response(events, info, svc.store, base_url)
    return JSONResponse(result.model_dump(), headers=headers)
