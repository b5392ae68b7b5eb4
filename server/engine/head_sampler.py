"""Batched flow-matching head sampling: the next token of many images at once.

Images that share a step schedule (sampler, steps, timesteps shift) advance through the N head
steps together: one head evaluation over all their branch rows per step, guidance combined per
image with its own scales, the update rule applied with each image's own counter-based noise.
The update, guidance and noise functions are the reference sampler's own, so every image gets
the token the reference generator would give it.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from model.nextstep import NextStepModel
from model.noise import token_noise
from model.sampling import (
    combine_guidance,
    finalize_token,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
    guidance_scales_at,
    legacy_final_step,
    legacy_sde_step,
    timesteps,
)

from .sequence import ImageState


def _schedule_key(image: ImageState) -> tuple:
    p = image.request.request.params
    return (p.sampler, p.num_steps, p.timesteps_shift)


def _guidance_key(image: ImageState) -> tuple:
    p = image.request.request.params
    return (len(image.branches), p.rescale_guidance)


class HeadSampler:
    def __init__(self, model: NextStepModel):
        self.model = model

    @torch.inference_mode()
    def sample(self, images: list[ImageState]) -> list[torch.Tensor]:
        """The next token of each image, float32 [token_dim] each, in the order given."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[_schedule_key(image)].append(i)
        tokens: list[torch.Tensor | None] = [None] * len(images)
        for members in groups.values():
            group = [images[i] for i in members]
            for i, token in zip(members, self._sample_group(group)):
                tokens[i] = token
        return tokens

    def _conditions(self, images: list[ImageState]) -> tuple[torch.Tensor, list[list[int]]]:
        """Head conditions of every branch row [R, hidden] and each image's row indices (branch order)."""
        model = self.model
        hidden, token_index, rows, next_row = [], [], [], 0
        for image in images:
            k = len(image.tokens)
            rows.append(list(range(next_row, next_row + len(image.branches))))
            next_row += len(image.branches)
            for branch in image.branches:
                hidden.append(branch.last_hidden)
                token_index.append(k)
        hidden = torch.stack(hidden)
        if model.gen_pos_embed is not None:
            limit = model.gen_pos_embed.shape[1]
            if max(token_index) >= limit:
                raise ValueError(f"image token {max(token_index)} is beyond gen_pos_embed ({limit} positions)")
            hidden = hidden + model.gen_pos_embed[0, torch.tensor(token_index, device=hidden.device)].to(hidden.dtype)
        return model.image_out_projector(hidden), rows

    def _sample_group(self, images: list[ImageState]) -> list[torch.Tensor]:
        model, device = self.model, self.model.device
        params = images[0].request.request.params
        conditions, rows = self._conditions(images)
        row_image = torch.tensor([i for i, r in enumerate(rows) for _ in r], device=device)
        # token_noise reads an int64 tensor as the seed's 64 bits
        seeds = torch.tensor([s - 2**64 if s >= 2**63 else s for s in (im.request.request.seed for im in images)])
        image_index = torch.tensor([im.index for im in images], dtype=torch.int64)
        token_index = torch.tensor([len(im.tokens) for im in images], dtype=torch.int64)
        dim = model.config.token_dim

        def noise(step: int) -> torch.Tensor:
            return token_noise(seeds, image_index, token_index, step, dim).to(device)

        # guidance per image: rows grouped by (branch count, rescale), each with per-image scales
        subsets = defaultdict(list)
        for i, image in enumerate(images):
            subsets[_guidance_key(image)].append(i)
        scales = [guidance_scales_at(im.request.request.params, len(im.tokens), im.request.num_tokens) for im in images]

        def guided_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            v = model.image_head.velocity(x[row_image], t, conditions)
            guided = torch.empty_like(x)
            for (branches, rescale), members in subsets.items():
                index = torch.tensor(members, device=device)
                branch_rows = torch.tensor([[rows[m][b] for m in members] for b in range(branches)], device=device)
                cfg = torch.tensor([[scales[m][0]] for m in members], device=device)
                cfg_img = torch.tensor([[scales[m][1]] for m in members], device=device)
                guided[index] = combine_guidance(v[branch_rows], cfg, cfg_img, rescale)
            return guided

        grid = timesteps(params).tolist()
        n = params.num_steps
        x = noise(0)
        if params.sampler == "legacy-sde":
            for i in range(n - 1):
                x = legacy_sde_step(x, guided_velocity(x, grid[i]), grid[i], grid[i + 1], noise(i + 1))
            x = legacy_final_step(x, guided_velocity(x, grid[n - 1]))
        else:
            for i in range(n):
                t, t_next = grid[i], grid[i + 1]
                v = guided_velocity(x, t)
                if params.sampler == "ode":
                    x = flow_ode_step(x, v, t, t_next)
                elif params.sampler == "sde":
                    x = flow_sde_step(x, v, t, t_next, noise(i + 1), sigma_max=grid[n - 1])
                else:
                    x = flow_cps_step(x, v, t, t_next, noise(i + 1))
        return [
            finalize_token(x[i : i + 1], image.request.request.params.use_norm)[0] for i, image in enumerate(images)
        ]
