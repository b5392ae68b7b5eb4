"""Batched head sampling: the next token of many images as one static-shaped program.

On GPU the whole N-step loop for a batch is captured once per key as a CUDA graph and replayed
(with the Triton-fused head step inside); on CPU the same loop runs eagerly and gives the
reference generator's tokens bit for bit.

All N head steps of a token for a batch of images run as one graph replay per
(sampler, steps, shift, guidance slots, bucket size). Everything an image may vary is an input
tensor: branch conditions, guidance scales, rescale and use_norm flags, seed/image/token
counters. Guidance uses a fixed number of slots per image (2, or 3 when some image has image
guidance); an image with fewer branches repeats its rows, which gives exactly its own formula
(the extra terms are (x - x) = 0). Padding rows are computed and dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import fused_head
from kernels.fused_head import FusedHead, guided_update
from model.nextstep import NextStepModel
from model.noise import philox_normal4
from model.sampling import (
    RESCALE_EPS,
    TOKEN_NORM_EPS,
    SamplingParams,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
    guidance_scales_at,
    legacy_final_step,
    legacy_sde_step,
    timesteps,
    update_coefficients,
)

from .sequence import ImageState
from .transfer import StaticInput, to_device

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class GraphKey:
    sampler: str
    num_steps: int
    timesteps_shift: float
    slots: int
    rescale: bool
    bucket: int


class StaticBatch:
    """Input and output tensors of one graph; filled before every replay."""

    def __init__(self, key: GraphKey, model: NextStepModel):
        b, device = key.bucket, model.device
        self.conditions = torch.zeros(key.slots, b, model.config.hidden_size, device=device, dtype=model.dtype)
        self.cfg = torch.ones(b, 1, device=device)
        self.cfg_img = torch.ones(b, 1, device=device)
        self.rescale = torch.zeros(b, 1, dtype=torch.bool, device=device)
        self.use_norm = torch.zeros(b, 1, dtype=torch.bool, device=device)
        self.seed = torch.zeros(b, 1, dtype=torch.int64, device=device)
        self.image = torch.zeros(b, 1, dtype=torch.int64, device=device)
        self.token = torch.zeros(b, 1, dtype=torch.int64, device=device)
        self.blocks = torch.arange(model.config.token_dim // 4, dtype=torch.int64, device=device)[None]
        self.out: torch.Tensor | None = None
        names = ("cfg", "cfg_img", "rescale", "use_norm", "seed", "image", "token")
        self.columns = {name: StaticInput(getattr(self, name)) for name in names}


def _all_noise(batch: StaticBatch, num_steps: int) -> torch.Tensor:
    """token_noise of every row for steps 0..num_steps at once: [num_steps + 1, B, D].

    One philox pass instead of one per step: a few dozen kernels rather than a few thousand.
    """
    steps = torch.arange(num_steps + 1, dtype=torch.int64, device=batch.token.device)[:, None, None]
    normals = philox_normal4(batch.blocks[None], batch.token[None], steps, batch.image[None], batch.seed[None])
    return normals.reshape(num_steps + 1, batch.token.shape[0], -1)


def _guided(v: torch.Tensor, batch: StaticBatch, rescale: bool) -> torch.Tensor:
    """v: [slots, B, D] -> guided [B, D], the reference's combine with per-row scales."""
    if v.shape[0] == 2:
        cond, uncond = v
        guided = uncond + batch.cfg * (cond - uncond)
    else:
        cond, uncond_image, uncond_none = v
        guided = uncond_none + batch.cfg_img * (uncond_image - uncond_none) + batch.cfg * (cond - uncond_image)
    if not rescale:  # no image in this batch asked for it
        return guided
    ratio = cond.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + RESCALE_EPS)
    return guided * torch.where(batch.rescale, torch.clamp(ratio, max=1.0), torch.ones_like(ratio))


def sample_loop(model: NextStepModel, key: GraphKey, batch: StaticBatch) -> torch.Tensor:
    """The whole N-step sampler for one token of every row; returns finalized tokens [B, D]."""
    grid = timesteps(_loop_params(key)).tolist()
    conditions = batch.conditions.reshape(key.slots * key.bucket, -1)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        v = model.image_head.velocity(x.repeat(key.slots, 1), t, conditions)
        return _guided(v.view(key.slots, key.bucket, -1), batch, key.rescale)

    n = key.num_steps
    noise = _all_noise(batch, n)
    x = noise[0]
    if key.sampler == "legacy-sde":
        for i in range(n - 1):
            x = legacy_sde_step(x, velocity(x, grid[i]), grid[i], grid[i + 1], noise[i + 1])
        x = legacy_final_step(x, velocity(x, grid[n - 1]))
    else:
        for i in range(n):
            t, t_next = grid[i], grid[i + 1]
            v = velocity(x, t)
            if key.sampler == "ode":
                x = flow_ode_step(x, v, t, t_next)
            elif key.sampler == "sde":
                x = flow_sde_step(x, v, t, t_next, noise[i + 1], sigma_max=grid[n - 1])
            else:
                x = flow_cps_step(x, v, t, t_next, noise[i + 1])
    normed = F.layer_norm(x, x.shape[-1:], eps=TOKEN_NORM_EPS)
    return torch.where(batch.use_norm, normed, x)


def _rescales(image: ImageState) -> bool:
    """The reference rescales only a guided velocity (more than one branch)."""
    return image.request.request.params.rescale_guidance and len(image.branches) > 1


def _loop_params(key: GraphKey) -> SamplingParams:
    return SamplingParams(
        sampler=key.sampler, num_steps=key.num_steps, timesteps_shift=key.timesteps_shift, guidance_scale=1.0,
        use_norm=False,
    )


def step_time_embeddings(fused: FusedHead, key: GraphKey, device: torch.device) -> torch.Tensor:
    """The time embedding of each of the key's sampling steps, [num_steps, D]: fused_sample_loop's t_emb."""
    grid = timesteps(_loop_params(key))[: key.num_steps].to(device=device, dtype=torch.float32)
    return fused.time_embedding(grid)


def fused_sample_loop(fused: FusedHead, key: GraphKey, batch: StaticBatch, t_emb: torch.Tensor) -> torch.Tensor:
    """sample_loop with the fused kernels: t_emb [N, D] holds the time embedding of each step's t."""
    params = _loop_params(key)
    rows = key.slots * key.bucket
    cond_emb = fused.cond_embedding(batch.conditions.reshape(rows, -1))
    chunk = max(1, min(key.num_steps, fused_head.MODULATION_CHUNK_ROWS // rows))
    counters = (batch.seed[:, 0], batch.image[:, 0], batch.token[:, 0])
    scales = (batch.cfg[:, 0], batch.cfg_img[:, 0], batch.rescale[:, 0])
    x = torch.zeros(key.bucket, batch.blocks.shape[1] * 4, device=batch.seed.device)
    x = guided_update(None, x, *scales, *counters, 0, 0.0, 0.0, 1.0, use_triton=fused.use_triton)
    for i in range(key.num_steps):
        if i % chunk == 0:
            mods = fused.modulations(t_emb[i : i + chunk], cond_emb)
        a, b, c = update_coefficients(params, i)
        x = fused.sampling_step(x, mods[i % chunk], key.slots, scales, counters, i + 1, a, b, c, key.rescale)
    normed = F.layer_norm(x, x.shape[-1:], eps=TOKEN_NORM_EPS)
    return torch.where(batch.use_norm, normed, x)


def bucket_for(rows: int) -> int:
    for size in BUCKETS:
        if size >= rows:
            return size
    return BUCKETS[-1]


class GraphedHeadSampler:
    """sample(images) -> the next token of each image; on CUDA each key's loop is a replayed graph."""

    def __init__(self, model: NextStepModel, use_graphs: bool | None = None, fused: bool | None = None):
        self.model = model
        self.use_graphs = model.device.type == "cuda" if use_graphs is None else use_graphs
        # fused Triton head on GPU; forced on CPU it runs under TRITON_INTERPRET=1 (tests)
        use_fused = model.device.type == "cuda" if fused is None else fused
        self.fused = FusedHead(model.image_head.net, use_triton=True) if use_fused else None
        self.time_embeddings: dict[GraphKey, torch.Tensor] = {}
        self.batches: dict[GraphKey, StaticBatch] = {}
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.pool = None

    @torch.inference_mode()
    def sample(self, images: list[ImageState]) -> list[torch.Tensor]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            p = image.request.request.params
            groups[(p.sampler, p.num_steps, p.timesteps_shift)].append(i)
        tokens: list[torch.Tensor | None] = [None] * len(images)
        for (sampler, steps, shift), members in groups.items():
            slots = 3 if any(len(images[i].branches) == 3 for i in members) else 2
            rescale = any(_rescales(images[i]) for i in members)
            for start in range(0, len(members), BUCKETS[-1]):
                part = members[start : start + BUCKETS[-1]]
                key = GraphKey(sampler, steps, shift, slots, rescale, bucket_for(len(part)))
                out = self._run(key, [images[i] for i in part])
                for row, i in enumerate(part):
                    tokens[i] = out[row]
        return tokens

    @torch.inference_mode()
    def warm_up(self, params: SamplingParams, max_images: int) -> None:
        """Capture now the graph of every bucket up to max_images text-guided images (two guidance
        slots) sampled with params (GPU)."""
        if not self.use_graphs:
            return
        largest = bucket_for(max_images)
        for bucket in BUCKETS[: BUCKETS.index(largest) + 1]:
            key = GraphKey(params.sampler, params.num_steps, params.timesteps_shift, 2, params.rescale_guidance, bucket)
            if key not in self.graphs:
                batch = self.batches.setdefault(key, StaticBatch(key, self.model))
                self.graphs[key] = self._capture(key, batch)

    def _fill(self, batch: StaticBatch, key: GraphKey, images: list[ImageState]) -> None:
        model = self.model
        # slot-major rows; an image with fewer branches repeats its last one (its extra terms are 0)
        rows = [
            image.branches[min(slot, len(image.branches) - 1)].last_hidden for slot in range(key.slots) for image in images
        ]
        hidden = torch.stack(rows).view(key.slots, len(images), -1)
        token_index = [len(image.tokens) for image in images]
        if model.gen_pos_embed is not None:
            if max(token_index) >= model.gen_pos_embed.shape[1]:
                raise ValueError(f"image token {max(token_index)} is beyond gen_pos_embed")
            positions = to_device(token_index, torch.int64, hidden.device)
            hidden = hidden + model.gen_pos_embed[0, positions].to(hidden.dtype)[None]
        n = len(images)
        pad = key.bucket - n
        if pad:
            batch.conditions[:, n:].zero_()
        batch.conditions[:, :n] = model.image_out_projector(hidden)
        scales = [guidance_scales_at(im.request.request.params, len(im.tokens), im.request.num_tokens) for im in images]

        def column(name, values):  # uploaded only when it changed since the last fill
            batch.columns[name].set(list(values) + [0] * pad)

        column("cfg", (s[0] for s in scales))
        column("cfg_img", (s[1] for s in scales))
        column("rescale", (_rescales(im) for im in images))
        column("use_norm", (im.request.request.params.use_norm for im in images))
        column("seed", (s - 2**64 if s >= 2**63 else s for s in (im.request.request.seed for im in images)))
        column("image", (im.index for im in images))
        column("token", token_index)

    def _run(self, key: GraphKey, images: list[ImageState]) -> torch.Tensor:
        batch = self.batches.get(key)
        if batch is None:
            batch = self.batches[key] = StaticBatch(key, self.model)
        self._fill(batch, key, images)
        if not self.use_graphs:
            return self._loop(key, batch)[: len(images)].clone()
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(key, batch)
        graph.replay()
        return batch.out[: len(images)].clone()

    def _loop(self, key: GraphKey, batch: StaticBatch) -> torch.Tensor:
        if self.fused is None:
            return sample_loop(self.model, key, batch)
        t_emb = self.time_embeddings.get(key)
        if t_emb is None:  # constant per key, computed outside any graph
            t_emb = self.time_embeddings[key] = step_time_embeddings(self.fused, key, self.model.device)
        return fused_sample_loop(self.fused, key, batch, t_emb)

    def _capture(self, key: GraphKey, batch: StaticBatch) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up allocator and kernels outside the graph
                self._loop(key, batch)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            batch.out = self._loop(key, batch)
        self.pool = graph.pool()
        return graph
