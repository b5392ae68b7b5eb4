"""Request and response bodies of the OpenAI Images API, plus our sampling extensions.

Unknown fields are rejected (as OpenAI does); the SDK sends our extensions through `extra_body`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.reference import MAX_SEED
from model.sampling import GUIDANCE_SCHEDULES, SAMPLERS

Quality = Literal["auto", "high", "medium", "low", "hd", "standard"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw; limited in tokens")
    model: str | None = Field(None, description="the served model id (GET /v1/models)")
    n: int | None = Field(1, ge=1, le=10, description="number of images")
    size: str | None = Field(
        "auto", pattern=r"^(auto|[0-9]{1,6}x[0-9]{1,6})$", description="WxH in multiples of 16, or auto (512x512)"
    )
    quality: Quality | None = Field(None, description="low: 1/2, medium: 3/4, others: all published steps")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="default b64_json")
    output_format: OutputFormat | None = Field(None, description="default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, default 100")
    background: Literal["transparent", "opaque", "auto"] | None = Field(None, description="transparent: 400")
    stream: bool | None = Field(None, description="Server-Sent Events")
    partial_images: int | None = Field(None, ge=0, le=3, description="previews per image when streaming")
    user: str | None = Field(None, description="end-user id; logged, never a metric label")
    safety_identifier: str | None = Field(None, description="accepted like `user`")
    # extensions
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses noise of (seed, i); default random")
    negative_prompt: str | None = Field(None, description="caption of the unconditional branch")
    positive_prompt: str | None = Field(None, description="appended to the prompt after one space")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="text guidance (cfg)")
    image_guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="edits: image guidance")
    num_inference_steps: int | None = Field(None, ge=1, description="sampling steps per token; overrides quality")
    sampler: Literal[SAMPLERS] | None = None
    timesteps_shift: float | None = Field(None, gt=0, allow_inf_nan=False)
    guidance_schedule: Literal[GUIDANCE_SCHEDULES] | None = None


class ImageGenerationRequest(ImageRequest):
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted, no effect")
    style: Literal["vivid", "natural"] | None = Field(None, description="dall-e-3 only: accepted, no effect")


class ImageEditRequest(ImageRequest):
    """The text fields of the multipart edit form; the files are `image` (or one `image[]`) and `mask`."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="accepted, no effect")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OutputTokensDetails(BaseModel):
    image_tokens: int
    text_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: str = "opaque"
    output_format: OutputFormat
    size: str
    quality: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nextstep-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def edit_form_schema() -> dict:
    """OpenAPI schema of the multipart edit form (the text fields plus the files)."""
    schema = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {
        "image": binary,
        "image[]": {"type": "array", "items": binary, "maxItems": 1},
        "mask": dict(binary, description="not supported: 400"),
        **schema["properties"],
    }
    schema["required"] = ["image", "prompt"]  # or one `image[]` instead of `image`
    return schema
