"""Continuous-batching policy at image-token granularity. Never touches tensors.

Each step, every running image whose branches are behind (a token to feed back, or a prompt
still prefilling) gets a chunk of positions, decodes first, within a token budget; waiting images
are admitted, oldest first, while KV blocks and the budget allow. When blocks run out the newest
running image is preempted: its blocks are freed and its sampled tokens kept, so it is recomputed
later to exactly the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import BranchSequence, ImageState, ImageStatus, RequestState


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_images: int = 256
    max_batched_tokens: int = 2048  # backbone positions per step (decodes + prefill chunks)


@dataclass(frozen=True)
class Chunk:
    image: ImageState
    branch: BranchSequence
    start: int  # first position computed this step
    end: int  # one past the last


@dataclass
class ScheduledStep:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[ImageState] = field(default_factory=list)
    num_tokens: int = 0  # positions over all chunks, kept as chunks come and go (summing each time is quadratic)

    def add(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.num_tokens += chunk.end - chunk.start

    def drop(self, image: ImageState) -> None:
        """Remove `image`'s chunks (it was preempted)."""
        self.chunks[:] = [c for c in self.chunks if c.image is not image]
        self.num_tokens = sum(c.end - c.start for c in self.chunks)


def _priority(image: ImageState) -> tuple[int, int]:
    return (image.request.arrival, image.index)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[ImageState] = []  # sorted by priority
        self.running: list[ImageState] = []  # sorted by priority

    def add(self, request: RequestState) -> None:
        self.waiting.extend(request.images)
        self.waiting.sort(key=_priority)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove_request(self, request: RequestState) -> None:
        """Drop every image of `request` (abort or failure) and free all its blocks."""
        for image in request.images:
            self._release(image)
        self.waiting = [i for i in self.waiting if i.request is not request]
        self.running = [i for i in self.running if i.request is not request]

    def finish(self, image: ImageState) -> None:
        self._release(image)
        image.status = ImageStatus.FINISHED
        self.running.remove(image)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        # decodes (one position per branch) before prefill chunks, oldest images first
        behind = sorted(self.running, key=lambda i: (i.positions_behind() > 1, _priority(i)))
        for image in behind:
            if image.status is ImageStatus.RUNNING:  # else preempted to make room for an older image
                self._schedule_image(image, step)
        self._admit(step)
        return step

    def _budget(self, step: ScheduledStep) -> int:
        return self.config.max_batched_tokens - step.num_tokens

    def _schedule_image(self, image: ImageState, step: ScheduledStep) -> None:
        for branch in image.branches:
            remaining = image.target_len(branch) - branch.num_computed
            budget = self._budget(step)
            if remaining <= 0 or budget <= 0:
                continue
            end = branch.num_computed + min(remaining, budget)
            while not self.blocks.grow(branch.block_table, end):
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is image:
                    return
            step.add(Chunk(image, branch, branch.num_computed, end))

    def _admit(self, step: ScheduledStep) -> None:
        admitted = []
        for image in self.waiting:
            if self._budget(step) <= 0 or len(self.running) >= self.config.max_running_images:
                break
            if not self._siblings_allow(image):
                continue
            hashes = [self._hashes(image, b) for b in image.branches]
            needed = sum(self.blocks.blocks_needed(image.target_len(b), h) for b, h in zip(image.branches, hashes))
            if needed > self.blocks.num_free:
                break  # keep arrival order: nothing younger jumps ahead
            for branch, branch_hashes in zip(image.branches, hashes):
                branch.num_computed = self.blocks.allocate(branch.block_table, image.target_len(branch), branch_hashes)
                branch.last_hidden = None
            image.status = ImageStatus.RUNNING
            self.running.append(image)
            self.running.sort(key=_priority)
            admitted.append(image)
            self._schedule_image(image, step)
        self.waiting = [i for i in self.waiting if i not in admitted]

    def _siblings_allow(self, image: ImageState) -> bool:
        """Image i > 0 waits until a running sibling has computed the shared prompt blocks."""
        siblings = [i for i in image.request.images if i is not image and i.status is ImageStatus.RUNNING]
        return all(all(b.num_computed >= b.prompt_len for b in s.branches) for s in siblings)

    def _hashes(self, image: ImageState, branch: BranchSequence) -> list[bytes]:
        digest = image.request.input_digest if branch.prompt.image_positions else b""
        return self.blocks.prompt_block_hashes(branch.prompt, digest)

    def _preempt(self, image: ImageState, step: ScheduledStep) -> None:
        self._release(image)
        image.status = ImageStatus.WAITING
        self.running.remove(image)
        step.drop(image)
        step.preempted.append(image)
        self.waiting.append(image)
        self.waiting.sort(key=_priority)

    def _release(self, image: ImageState) -> None:
        for branch in image.branches:
            self.blocks.release(branch.block_table)
            branch.num_computed = 0
            branch.last_hidden = None
