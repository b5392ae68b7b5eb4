"""An API request -> a validated JobSpec, or an ApiError saying which field is wrong.

Everything a worker would reject is rejected here first (sizes, sampling parameters, prompt
tokens, the input image), so a bad request is a 400 before it ever takes a queue slot.

`quality` picks the step count when num_inference_steps is absent: low = 1/2 and medium = 3/4 of
the model's published steps; high, hd, standard and auto = the published steps.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
import uuid
from dataclasses import asdict

from model.config import NextStepConfig
from model.prompts import PromptError, build_prompt_branches, edit_caption
from model.reference import with_overrides
from model.sampling import SamplingError, SamplingParams, branch_count
from model.sampling_defaults import SamplingDefaults

from .config import Settings
from .errors import ApiError, bad_request
from .images import InputImageError, check_input_image
from .jobs import JobSpec
from .schemas import ImageRequest
from .served_model import ServedModel

QUALITY_STEP_FRACTIONS = {"low": 0.5, "medium": 0.75}
MAX_CHARS_PER_TOKEN = 64  # rejects absurd prompts before spending time tokenizing them
_SIZE = re.compile(r"^(\d{1,6})x(\d{1,6})$")
# SamplingParams field -> the request field a client sets
_PARAM_NAMES = {
    "num_steps": "num_inference_steps",
    "sampler": "sampler",
    "timesteps_shift": "timesteps_shift",
    "guidance_scale": "guidance_scale",
    "image_guidance_scale": "image_guidance_scale",
    "guidance_schedule": "guidance_schedule",
}


def parse_size(size: str | None, settings: Settings, config: NextStepConfig) -> tuple[int, int]:
    """'WxH' or 'auto' -> (width, height): multiples of the model's token size, at most max_pixels."""
    downsample = config.downsample
    native = f"{config.native_image_size}x{config.native_image_size}"
    text = (settings.default_size or native) if size in (None, "auto") else size
    match = _SIZE.match(text)
    if match is None:
        raise bad_request(f"size must be 'auto' or WIDTHxHEIGHT like '512x512'; got {size!r}", "size")
    width, height = int(match[1]), int(match[2])
    if width < downsample or height < downsample or width % downsample or height % downsample:
        raise bad_request(f"width and height must be positive multiples of {downsample}; got {text}", "size")
    if width * height > settings.max_pixels:
        raise bad_request(f"size {text} has more than the {settings.max_pixels} pixels allowed", "size")
    return width, height


def quality_steps(published_steps: int, quality: str | None, min_steps: int) -> int:
    fraction = QUALITY_STEP_FRACTIONS.get(quality or "auto", 1.0)
    return max(min_steps, round(published_steps * fraction))


def sampling_params(request: ImageRequest, settings: Settings, model_defaults: SamplingDefaults, edit: bool) -> SamplingParams:
    try:
        defaults = model_defaults.params(edit)
    except SamplingError as err:
        raise bad_request(str(err), "image", "unsupported_operation") from err
    steps = request.num_inference_steps or quality_steps(
        defaults.num_steps, request.quality, 2 if (request.sampler or defaults.sampler) == "legacy-sde" else 1
    )
    if steps > settings.max_steps:
        raise bad_request(
            f"num_inference_steps must be at most {settings.max_steps}; got {steps}", "num_inference_steps"
        )
    try:
        return with_overrides(
            defaults,
            num_steps=steps,
            sampler=request.sampler,
            timesteps_shift=request.timesteps_shift,
            guidance_scale=request.guidance_scale,
            image_guidance_scale=request.image_guidance_scale,
            guidance_schedule=request.guidance_schedule,
        )
    except SamplingError as err:
        raise bad_request(str(err), _PARAM_NAMES.get(str(err).split(" ", 1)[0])) from err


def check_text_tokens(text: str | None, param: str, served: ServedModel, settings: Settings) -> None:
    if not text:
        return
    limit = settings.max_prompt_tokens
    if len(text) > limit * MAX_CHARS_PER_TOKEN or len(served.tokenizer.encode(text)) > limit:
        raise bad_request(f"{param} is longer than the {limit} tokens allowed", param, "prompt_too_long")


def input_image_b64(image: bytes | None, settings: Settings) -> str | None:
    if image is None:
        return None
    if len(image) > settings.max_upload_bytes:
        raise ApiError(
            413, f"the image is {len(image)} bytes; the limit is {settings.max_upload_bytes}", param="image",
            code="image_too_large",
        )  # fmt: skip
    try:
        check_input_image(image, settings.max_input_pixels)
    except InputImageError as err:
        raise bad_request(str(err), "image", "invalid_image") from err
    return base64.b64encode(image).decode("ascii")


def build_job(request: ImageRequest, served: ServedModel, settings: Settings, image: bytes | None = None) -> JobSpec:
    """Validate a generation (image None) or an edit (image = the uploaded file's bytes) into a job."""
    config = served.config
    if request.model is not None and request.model != served.model_id:
        raise ApiError(
            404, f"The model '{request.model}' does not exist; this server serves '{served.model_id}'.",
            param="model", code="model_not_found",
        )  # fmt: skip
    if request.background == "transparent":
        raise bad_request("background=transparent is not supported: the model renders opaque RGB", "background")
    n = request.n or 1
    if n > settings.max_n:
        raise bad_request(f"n must be at most {settings.max_n} on this server; got {n}", "n")
    width, height = parse_size(request.size, settings, config)
    edit = image is not None
    params = sampling_params(request, settings, served.sampling_defaults, edit)
    prompt = edit_caption(request.prompt) if edit else request.prompt
    for text, param in ((request.prompt, "prompt"), (request.negative_prompt, "negative_prompt"),
                        (request.positive_prompt, "positive_prompt")):  # fmt: skip
        check_text_tokens(text, param, served, settings)

    grid_h, grid_w = height // config.downsample, width // config.downsample
    try:
        branches = build_prompt_branches(
            served.tokenizer, config, prompt, grid_h, grid_w,
            num_branches=branch_count(params, edit),
            negative_prompt=request.negative_prompt or "",
            positive_prompt=request.positive_prompt,
            input_grid=(grid_h, grid_w) if edit else None,
        )  # fmt: skip
    except PromptError as err:
        raise bad_request(str(err), "prompt") from err
    longest = max(len(branch.token_ids) for branch in branches) + grid_h * grid_w
    if longest > config.max_position_embeddings:
        raise bad_request(
            f"prompt plus image take {longest} tokens; the model's context is {config.max_position_embeddings}",
            "size", "context_length_exceeded",
        )  # fmt: skip
    input_image_tokens = grid_h * grid_w if edit else 0
    image_b64 = input_image_b64(image, settings)
    now = time.time()
    return JobSpec(
        job_id=uuid.uuid4().hex,
        prompt=prompt,
        width=width,
        height=height,
        n=n,
        seed=request.seed if request.seed is not None else secrets.randbits(63),
        params=asdict(params),
        negative_prompt=request.negative_prompt or "",
        positive_prompt=request.positive_prompt,
        image_b64=image_b64,
        partial_images=(request.partial_images or 0) if request.stream else 0,
        output_format=request.output_format or "png",
        output_compression=100 if request.output_compression is None else request.output_compression,
        enqueued_at=now,
        deadline=now + settings.request_timeout_s,
        text_tokens=len(branches[0].token_ids) - input_image_tokens,
        input_image_tokens=input_image_tokens,
    )
