"""State of requests, images and their guidance-branch sequences inside the engine.

One request = n images; one image = 1-3 branch sequences that advance in lockstep and share the
sampled tokens. A branch's sequence is its prompt (token ids, with image placeholders) followed by
the image tokens generated so far; the KV cache holds the first `num_computed` positions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from model.prompts import PromptSequence
from model.reference import GenerationRequest

from .events import EngineRequest


class ImageStatus(enum.Enum):
    WAITING = "waiting"  # no KV blocks (new, or preempted: its tokens are kept for recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class BranchSequence:
    prompt: PromptSequence
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose K/V are in the cache
    last_hidden: torch.Tensor | None = None  # final normed hidden state of the newest position
    placeholder_rows: dict[int, int] = field(init=False)  # prompt position -> input latent row

    def __post_init__(self):
        self.placeholder_rows = {p: i for i, p in enumerate(self.prompt.image_positions)}

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)


@dataclass(eq=False)
class ImageState:
    request: "RequestState"
    index: int
    branches: list[BranchSequence]
    tokens: list[torch.Tensor] = field(default_factory=list)  # sampled tokens, float32 [token_dim] each
    status: ImageStatus = ImageStatus.WAITING
    previews_sent: int = 0

    @property
    def num_tokens_total(self) -> int:
        return self.request.num_tokens

    def target_len(self, branch: BranchSequence) -> int:
        """Positions `branch` must have computed before the next token can be sampled."""
        return branch.prompt_len + len(self.tokens)

    def positions_behind(self) -> int:
        return max(self.target_len(b) - b.num_computed for b in self.branches)

    @property
    def ready_to_sample(self) -> bool:
        return all(b.num_computed == self.target_len(b) and b.last_hidden is not None for b in self.branches)

    @property
    def done(self) -> bool:
        return len(self.tokens) == self.request.num_tokens


@dataclass(eq=False)
class RequestState:
    spec: EngineRequest
    grid_h: int
    grid_w: int
    prompts: tuple[PromptSequence, ...]
    input_tokens: torch.Tensor | None  # edit input latent tokens [P, token_dim] float32, or None
    input_digest: bytes  # content hash of the input image (prefix-cache key), b"" without one
    arrival: int  # engine step at which it arrived (scheduling order)
    images: list[ImageState] = field(default_factory=list)
    finished_images: int = 0

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def request(self) -> GenerationRequest:
        return self.spec.request

    @property
    def num_tokens(self) -> int:
        return self.grid_h * self.grid_w
