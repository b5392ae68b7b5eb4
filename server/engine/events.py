"""What an engine is asked to do and what it reports back.

Engines call `on_event` from their own thread, inside `step()`; the worker turns events into
previews, results and metrics. An engine never raises for one request's bad input: it reports
RequestFailed for that request and carries on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

import numpy as np

from model.reference import GenerationRequest


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    request: GenerationRequest
    partial_images: int = 0  # previews per image, sent at evenly spaced token counts


@dataclass(frozen=True)
class ImagePreview:
    request_id: str
    image_index: int
    preview_index: int
    tokens_done: int
    tokens_total: int
    pixels: np.ndarray  # uint8 [H, W, 3]


@dataclass(frozen=True)
class ImageDone:
    request_id: str
    image_index: int
    pixels: np.ndarray  # uint8 [H, W, 3]


@dataclass(frozen=True)
class RequestDone:
    request_id: str
    prompt_tokens: int  # text tokens of the conditional prompt
    image_tokens: int  # image tokens generated over all images


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    message: str
    client_error: bool  # True: the request itself was bad (maps to a 4xx)


EngineEvent = Union[ImagePreview, ImageDone, RequestDone, RequestFailed]
EventSink = Callable[[EngineEvent], None]


@dataclass(frozen=True)
class EngineStats:
    running_images: int
    waiting_requests: int
    kv_cache_usage: float  # 0..1
    prefix_cache_hit_rate: float  # 0..1 over the engine's lifetime
    steps: int


class Engine(Protocol):
    def add_request(self, request: EngineRequest) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> None: ...

    def stats(self) -> EngineStats: ...


def preview_points(partial_images: int, tokens_total: int) -> list[int]:
    """Token counts after which previews 0..partial_images-1 are sent (evenly spaced, before the end)."""
    points = [tokens_total * (i + 1) // (partial_images + 1) for i in range(partial_images)]
    return [max(1, p) for p in points]
