"""The batched engine: ties the scheduler (policy), the model runner and head sampler (mechanism).

Each step: schedule chunks -> one backbone pass -> one head sampling for every image whose
branches are all up to date -> feed tokens back, send previews, decode and retire finished images.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from model.bundle import ModelBundle
from model.reference import token_grid, validate_request
from model.sampling import SamplingError, SamplingParams

from .block_manager import BlockManager
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
from .graphed_head import GraphedHeadSampler
from .model_runner import ModelRunner
from .scheduler import Scheduler, SchedulerConfig
from .sequence import BranchSequence, ImageState, RequestState


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: from kv_cache_bytes
    kv_cache_bytes: int | None = None  # None: 512 MiB on CPU; on GPU what is free after the weights, less headroom
    max_running_images: int = 256
    max_batched_tokens: int = 2048
    attention_backend: str | None = None  # None: automatic (reference on CPU)
    fused_head: bool | None = None  # Triton-fused head step inside that loop; None: on GPU only
    fused_backbone: bool | None = None  # Triton kernels between the backbone's matrix products; None: on GPU only
    time_phases: bool = False  # synchronize the GPU after each phase so StepTimings splits time exactly (slower)
    warm_up: bool = True  # on GPU, capture the CUDA graphs of default requests when the engine starts


@dataclass
class StepTimings:
    """Seconds spent per phase over the engine's lifetime (for benchmarks and metrics)."""

    schedule: float = 0.0
    backbone: float = 0.0
    head: float = 0.0
    vae: float = 0.0
    steps: int = 0
    batch_sizes: list[int] = field(default_factory=list)


GPU_HEADROOM_BYTES = 12 * 2**30  # activations, CUDA graphs, VAE decode
WARM_UP_PROMPT_TOKENS = 256  # prompt positions the start-up graphs allow beside a native-size image


def default_kv_cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 512 * 2**20
    free, _ = torch.cuda.mem_get_info(device)
    return max(free - GPU_HEADROOM_BYTES, free // 4)


class BatchedEngine:
    def __init__(self, bundle: ModelBundle, on_event: EventSink, config: EngineConfig = EngineConfig()):
        self.bundle = bundle
        self.on_event = on_event
        self.config = config
        kv_bytes = config.kv_cache_bytes or default_kv_cache_bytes(bundle.model.device)
        num_blocks = config.num_blocks or max(1, kv_bytes // ModelRunner.kv_bytes_per_block(bundle, config.block_size))
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(config.max_running_images, config.max_batched_tokens), self.blocks)
        self.runner = ModelRunner(
            bundle, num_blocks, config.block_size, config.attention_backend, fused_kernels=config.fused_backbone
        )
        self.head = GraphedHeadSampler(bundle.model, fused=config.fused_head)
        self.generator = self.runner.generator
        self.requests: dict[str, RequestState] = {}
        self.timings = StepTimings()
        self._arrivals = 0
        if config.warm_up and bundle.model.device.type == "cuda":
            native = bundle.config.native_image_size
            grid_h, grid_w = token_grid(bundle.config, native, native)
            try:
                params = bundle.sampling_defaults.params(edit=False)
            except SamplingError:  # a family without published defaults: nothing to guess
                params = None
            if params is not None:
                self.warm_up(params, WARM_UP_PROMPT_TOKENS + grid_h * grid_w)

    def warm_up(self, params: SamplingParams, max_len: int) -> None:
        """Capture now (GPU only) every CUDA graph that batches of up to max_running_images
        text-to-image requests sampled with params replay up to max_len positions per sequence: a
        capture stalls the whole running batch, so requests should never meet one. Other requests
        (edits, other samplers or step counts) capture theirs on first use."""
        images = self.config.max_running_images
        self.runner.warm_up_decode(2 * images, max_len)  # text guidance: two sequences per image
        self.head.warm_up(params, images)

    # requests in and out

    def add_request(self, spec: EngineRequest) -> None:
        if spec.request_id in self.requests:
            self.on_event(RequestFailed(spec.request_id, "duplicate request id", client_error=True))
            return
        try:
            state = self._prepare(spec)
        except ValueError as err:
            self.on_event(RequestFailed(spec.request_id, str(err), client_error=True))
            return
        self.requests[spec.request_id] = state
        self.scheduler.add(state)

    def _prepare(self, spec: EngineRequest) -> RequestState:
        request = spec.request
        validate_request(self.bundle.config, request)
        grid_h, grid_w = token_grid(self.bundle.config, request.width, request.height)
        prompts = self.generator.prompt_branches(request)
        num_tokens = grid_h * grid_w
        longest = max(len(p.token_ids) for p in prompts) + num_tokens
        if longest > self.bundle.config.max_position_embeddings:
            raise ValueError("prompt plus image tokens exceed the model's max_position_embeddings")
        gen_pos_embed = self.bundle.model.gen_pos_embed
        if gen_pos_embed is not None and num_tokens > gen_pos_embed.shape[1]:
            raise ValueError(f"{num_tokens} image tokens exceed the model's {gen_pos_embed.shape[1]} image positions")
        blocks_needed = sum(self.blocks.blocks_for(len(p.token_ids) + num_tokens) for p in prompts)
        if blocks_needed > self.blocks.num_blocks:
            raise ValueError(
                f"one image needs {blocks_needed} KV blocks but the cache has {self.blocks.num_blocks}; "
                "use a smaller size or a shorter prompt"
            )
        input_tokens, digest = None, b""
        if request.image is not None:
            input_tokens = self.generator.input_image_tokens(request)[0].float()
            digest = hashlib.sha256(input_tokens.cpu().numpy().tobytes()).digest()
        state = RequestState(spec, grid_h, grid_w, prompts, input_tokens, digest, arrival=self._arrivals)
        self._arrivals += 1
        state.images = [ImageState(state, i, [BranchSequence(p) for p in prompts]) for i in range(request.n)]
        return state

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.scheduler.remove_request(state)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            running_images=len(self.scheduler.running),
            waiting_requests=len({i.request.request_id for i in self.scheduler.waiting}),
            kv_cache_usage=self.blocks.usage(),
            prefix_cache_hit_rate=self.blocks.hit_rate(),
            steps=self.timings.steps,
        )

    # the loop body

    def step(self) -> None:
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.timings.schedule += time.perf_counter() - started
        if not scheduled.chunks:
            return
        started = time.perf_counter()
        hidden = self.runner.backbone(scheduled.chunks)
        for row, chunk in enumerate(scheduled.chunks):
            chunk.branch.num_computed = chunk.end
            self.blocks.mark_computed(chunk.branch.block_table, chunk.end)
            if chunk.end == chunk.image.target_len(chunk.branch):
                chunk.branch.last_hidden = hidden[row]
        self._sync()
        self.timings.backbone += time.perf_counter() - started

        ready = [i for i in self.scheduler.running if i.ready_to_sample]
        if ready:
            started = time.perf_counter()
            try:
                tokens = self.head.sample(ready)
            except ValueError as err:  # e.g. a token beyond gen_pos_embed: fail those requests only
                for state in {i.request for i in ready}:
                    self._fail(state, str(err))
                return
            self._sync()
            self.timings.head += time.perf_counter() - started
            self.timings.batch_sizes.append(len(ready))
            for image, token in zip(ready, tokens):
                self._accept_token(image, token)
        self.timings.steps += 1

    def _accept_token(self, image: ImageState, token: torch.Tensor) -> None:
        image.tokens.append(token)
        for branch in image.branches:
            branch.last_hidden = None
        state = image.request
        done, total = len(image.tokens), state.num_tokens
        points = preview_points(state.spec.partial_images, total)
        if image.previews_sent < len(points) and done >= points[image.previews_sent] and done < total:
            started = time.perf_counter()
            pixels = self._decode_partial(image)
            self.timings.vae += time.perf_counter() - started
            self.on_event(ImagePreview(state.request_id, image.index, image.previews_sent, done, total, pixels))
            image.previews_sent += 1
        if image.done:
            started = time.perf_counter()
            pixels = self.runner.decode_image(torch.stack(image.tokens), state.grid_h, state.grid_w)
            self.timings.vae += time.perf_counter() - started
            self.scheduler.finish(image)
            self.on_event(ImageDone(state.request_id, image.index, pixels.cpu().numpy()))
            state.finished_images += 1
            if state.finished_images == len(state.images):
                del self.requests[state.request_id]
                prompt_tokens = len(state.prompts[0].token_ids)
                self.on_event(RequestDone(state.request_id, prompt_tokens, total * len(state.images)))

    def _decode_partial(self, image: ImageState):
        state = image.request
        tokens = torch.stack(image.tokens)
        padding = tokens.new_zeros(state.num_tokens - tokens.shape[0], tokens.shape[1])
        return self.runner.decode_image(torch.cat([tokens, padding]), state.grid_h, state.grid_w).cpu().numpy()

    def _fail(self, state: RequestState, message: str) -> None:
        self.requests.pop(state.request_id, None)
        self.scheduler.remove_request(state)
        self.on_event(RequestFailed(state.request_id, message, client_error=False))

    def _sync(self) -> None:
        if self.config.time_phases and self.bundle.model.device.type == "cuda":
            torch.cuda.synchronize()
