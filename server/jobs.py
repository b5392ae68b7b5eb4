"""A job as it travels from the API to a worker (JSON, so it fits a Redis stream) and the events it yields back.

Jobs and events cross process boundaries: both parse strictly and raise JobFormatError on anything
malformed, so a corrupt message is dead-lettered instead of crashing a worker.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import asdict, dataclass, field

from PIL import Image

from model.reference import GenerationRequest
from model.sampling import SamplingParams

from .engine.events import EngineRequest

OUTPUT_FORMATS = ("png", "jpeg", "webp")


class JobFormatError(ValueError):
    """A job or event message that does not parse."""


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    prompt: str  # the final caption (an edit's holds "<image>" once)
    width: int
    height: int
    n: int
    seed: int
    params: dict  # SamplingParams fields
    negative_prompt: str = ""
    positive_prompt: str | None = None
    image_b64: str | None = None  # edit input, the uploaded file's bytes
    partial_images: int = 0
    output_format: str = "png"
    output_compression: int = 100
    enqueued_at: float = 0.0  # unix time
    deadline: float = 0.0  # unix time after which nobody waits for the result
    text_tokens: int = 0  # usage, counted by the API
    input_image_tokens: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("a job must be a JSON object")
            values = {k: v for k, v in raw.items() if k in _JOB_FIELD_TYPES}
            for key, value in values.items():
                if not isinstance(value, _JOB_FIELD_TYPES[key]) or isinstance(value, bool):
                    raise TypeError(f"{key} has the wrong type ({type(value).__name__})")
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise JobFormatError(f"malformed job: {err}") from err

    @property
    def is_edit(self) -> bool:
        return self.image_b64 is not None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def engine_request(self) -> EngineRequest:
        """The engine's view of this job; raises ValueError if the job cannot be rendered."""
        if self.output_format not in OUTPUT_FORMATS or not 0 <= self.output_compression <= 100:
            raise JobFormatError(f"cannot encode {self.output_format!r} at compression {self.output_compression!r}")
        image = None
        if self.image_b64 is not None:
            try:
                image = Image.open(io.BytesIO(base64.b64decode(self.image_b64, validate=True)))
                image.load()
            except (OSError, binascii.Error, Image.DecompressionBombError) as err:
                raise JobFormatError(f"the input image cannot be decoded: {err}") from err
        try:
            params = SamplingParams(**self.params)
        except TypeError as err:
            raise JobFormatError(f"params must be an object of sampling parameters: {err}") from err
        request = GenerationRequest(
            prompt=self.prompt,
            width=self.width,
            height=self.height,
            params=params,
            n=self.n,
            seed=self.seed,
            negative_prompt=self.negative_prompt,
            positive_prompt=self.positive_prompt,
            image=image,
        )
        return EngineRequest(self.job_id, request, partial_images=self.partial_images)


_NUMBER = (int, float)
_JOB_FIELD_TYPES = {
    "job_id": str, "prompt": str, "width": int, "height": int, "n": int, "seed": int, "params": dict,
    "negative_prompt": str, "positive_prompt": (str, type(None)), "image_b64": (str, type(None)),
    "partial_images": int, "output_format": str, "output_compression": int, "enqueued_at": _NUMBER,
    "deadline": _NUMBER, "text_tokens": int, "input_image_tokens": int,
}  # fmt: skip


@dataclass(frozen=True)
class PreviewEvent:
    image_index: int
    partial_index: int
    b64: str  # the preview encoded in the job's output format
    type: str = field(default="preview", init=False)


@dataclass(frozen=True)
class ResultEvent:
    images: list  # base64 of each image, in the job's output format
    text_tokens: int
    input_image_tokens: int
    output_tokens: int
    type: str = field(default="result", init=False)


@dataclass(frozen=True)
class FailedEvent:
    message: str
    client_error: bool  # True: the request was bad (4xx); False: the server failed (5xx)
    code: str | None = None
    type: str = field(default="failed", init=False)


JobEvent = PreviewEvent | ResultEvent | FailedEvent
_EVENT_TYPES = {cls.type: cls for cls in (PreviewEvent, ResultEvent, FailedEvent)}  # type: ignore[attr-defined]


def is_terminal(event: JobEvent) -> bool:
    return not isinstance(event, PreviewEvent)


def event_to_json(event: JobEvent) -> str:
    return json.dumps(asdict(event), separators=(",", ":"))


def event_from_json(text: str | bytes) -> JobEvent:
    try:
        raw = json.loads(text)
        cls = _EVENT_TYPES[raw.pop("type")]
        return cls(**raw)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise JobFormatError(f"malformed job event: {err}") from err
