"""An engine that renders one request at a time with the reference generator.

It is the oracle behind the Engine interface: simple, slow, and exactly the reference's images.
The batched engine replaces it for serving; tests use it to check the serving path end to end.
"""

from __future__ import annotations

from collections import deque

import torch

from model.bundle import ModelBundle
from model.reference import token_grid

from .events import (
    EngineRequest,
    EngineStats,
    EventSink,
    ImageDone,
    ImagePreview,
    RequestDone,
    RequestFailed,
    preview_points,
)


class _Aborted(Exception):
    pass


class SequentialEngine:
    def __init__(self, bundle: ModelBundle, on_event: EventSink):
        self.bundle = bundle
        self.generator = bundle.reference_generator()
        self.on_event = on_event
        self.waiting: deque[EngineRequest] = deque()
        self.aborted: set[str] = set()
        self.running_id: str | None = None
        self.steps = 0

    def add_request(self, request: EngineRequest) -> None:
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting)

    def stats(self) -> EngineStats:
        running = self.waiting[0].request.n if self.running_id else 0
        return EngineStats(running, len(self.waiting) - bool(self.running_id), 0.0, 0.0, self.steps)

    def step(self) -> None:
        """Render the oldest waiting request completely (or until it is aborted)."""
        if not self.waiting:
            return
        job = self.waiting[0]
        self.running_id = job.request_id
        try:
            self._render(job)
        except _Aborted:
            pass
        except ValueError as err:
            self.on_event(RequestFailed(job.request_id, str(err), client_error=True))
        finally:
            self.waiting.popleft()
            self.aborted.discard(job.request_id)
            self.running_id = None
            self.steps += 1

    def _render(self, job: EngineRequest) -> None:
        request = job.request
        if job.request_id in self.aborted:
            raise _Aborted
        grid_h, grid_w = token_grid(self.bundle.config, request.width, request.height)
        total = grid_h * grid_w
        points = preview_points(job.partial_images, total)
        sampled = []

        def on_token(k, tokens):
            if job.request_id in self.aborted:
                raise _Aborted
            sampled.append(tokens)
            if k + 1 in points:
                pixels = self._decode_partial(sampled, total, grid_h, grid_w)
                for i in range(request.n):
                    self.on_event(ImagePreview(job.request_id, i, points.index(k + 1), k + 1, total, pixels[i]))

        result = self.generator.generate(request, on_token=on_token)
        for i in range(request.n):
            self.on_event(ImageDone(job.request_id, i, result.pixels[i].numpy()))
        prompt_tokens = len(self.generator.prompt_branches(request)[0].token_ids)
        self.on_event(RequestDone(job.request_id, prompt_tokens, total * request.n))

    def _decode_partial(self, sampled, total, grid_h, grid_w):
        """Decode the rows generated so far; the rest of the latent is zeros (a flat preview)."""
        tokens = torch.stack(sampled, dim=1)
        padding = tokens.new_zeros(tokens.shape[0], total - tokens.shape[1], tokens.shape[2])
        return self.generator.decode(torch.cat([tokens, padding], dim=1), grid_h, grid_w).numpy()
