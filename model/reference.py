"""The reference generator: one request, plain contiguous KV caches, read top to bottom.

This is the oracle every faster path is tested against. A request is n images of one prompt;
each image has 1-3 guidance branches (sequences) that advance in lockstep and share the sampled
tokens. The n images of a branch have identical prompts, so each branch is one [n, T] batch with
its own contiguous KV cache. Noise is `token_noise(seed, image, token, step)`: an image never
depends on what else was computed with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from PIL import Image

from .config import NextStepConfig
from .decoder import KVCache
from .latents import decode_image_tokens, encode_image_tokens, image_to_pixels, pixels_to_uint8
from .nextstep import NextStepModel
from .noise import posterior_noise, token_noise
from .prompts import PromptSequence, build_prompt_branches
from .sampling import SamplingParams, branch_count, finalize_token, sample_token
from .tokenizer import TextTokenizer
from .vae import AutoencoderKL, VAEConfig

MAX_SEED = 2**64 - 1


class RequestError(ValueError):
    """A generation request the model cannot serve."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    width: int
    height: int
    params: SamplingParams
    n: int = 1
    seed: int = 0
    negative_prompt: str = ""
    positive_prompt: str | None = None
    image: Image.Image | None = None  # edit input; the prompt then holds "<image>" once


@dataclass
class ImageTokens:
    """What the reference produced for one request: tokens [n, N, token_dim] float32 and uint8 images [n, H, W, 3]."""

    tokens: torch.Tensor
    pixels: torch.Tensor

    def to_pil(self) -> list[Image.Image]:
        return [Image.fromarray(p.numpy()) for p in self.pixels]


def token_grid(config: NextStepConfig, width: int, height: int) -> tuple[int, int]:
    """(grid_h, grid_w) of image tokens for a pixel size; clear error when the size is unusable."""
    step = config.downsample
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % step:
            raise RequestError(f"{name} must be a positive multiple of {step}, got {value!r}")
    return height // step, width // step


def validate_request(config: NextStepConfig, request: GenerationRequest) -> None:
    token_grid(config, request.width, request.height)
    if not isinstance(request.n, int) or request.n < 1:
        raise RequestError(f"n must be a positive integer, got {request.n!r}")
    if not isinstance(request.seed, int) or not 0 <= request.seed <= MAX_SEED:
        raise RequestError(f"seed must be an integer in [0, 2**64), got {request.seed!r}")
    request.params.validate()


class ReferenceGenerator:
    def __init__(self, model: NextStepModel, tokenizer: TextTokenizer, vae: AutoencoderKL, vae_config: VAEConfig):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.vae = vae
        self.vae_config = vae_config

    def prompt_branches(self, request: GenerationRequest) -> tuple[PromptSequence, ...]:
        grid_h, grid_w = token_grid(self.config, request.width, request.height)
        has_image = request.image is not None
        return build_prompt_branches(
            self.tokenizer,
            self.config,
            request.prompt,
            grid_h,
            grid_w,
            num_branches=branch_count(request.params, has_image),
            negative_prompt=request.negative_prompt,
            positive_prompt=request.positive_prompt,
            input_grid=(grid_h, grid_w) if has_image else None,
        )

    def input_image_tokens(self, request: GenerationRequest) -> torch.Tensor:
        """The edit input's latent tokens [1, grid_h*grid_w, token_dim] float32 (resized/cropped to the output size)."""
        pixels = image_to_pixels(request.image, request.width, request.height)[None]
        pixels = pixels.to(device=self.model.device, dtype=next(self.vae.parameters()).dtype)
        noise = None
        if not self.vae_config.deterministic:
            shape = (1, self.vae_config.z_channels, request.height // 8, request.width // 8)
            noise = posterior_noise(request.seed, math.prod(shape)).view(shape).to(self.model.device)
        return encode_image_tokens(self.vae, self.vae_config, pixels, self.config.latent_patch_size, noise=noise)

    @torch.inference_mode()
    def generate(
        self, request: GenerationRequest, on_token: Callable[[int, torch.Tensor], None] | None = None
    ) -> ImageTokens:
        """Render a request. on_token(k, tokens[n, token_dim]) is called after each image token."""
        validate_request(self.config, request)
        model, n = self.model, request.n
        grid_h, grid_w = token_grid(self.config, request.width, request.height)
        num_tokens = grid_h * grid_w
        branches = self.prompt_branches(request)
        image_tokens = self.input_image_tokens(request) if request.image is not None else None
        if max(len(b.token_ids) for b in branches) + num_tokens > self.config.max_position_embeddings:
            raise RequestError("prompt plus image tokens exceed the model's max_position_embeddings")

        # prefill every branch; keep each one's last hidden state
        caches, last_hidden = [], []
        for branch in branches:
            cache = KVCache(self.config, n, len(branch.token_ids) + num_tokens, model.device, model.dtype)
            ids = torch.tensor(branch.token_ids, device=model.device)[None].expand(n, -1)
            positions = torch.tensor(branch.image_positions, dtype=torch.long, device=model.device)
            images = image_tokens.expand(n, -1, -1) if branch.image_positions else None
            hidden = model.forward_hidden(model.embed(ids, positions, images), cache)
            caches.append(cache)
            last_hidden.append(hidden[:, -1])

        images_index = torch.arange(n, device=model.device)
        sampled = []
        for k in range(num_tokens):
            # [branches * n, hidden]: branch-major, the rows the head evaluates together
            conditions = torch.cat([model.head_condition(h, k) for h in last_hidden])

            def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
                rows = x.repeat(len(branches), 1)
                return model.image_head.velocity(rows, t, conditions).view(len(branches), n, -1)

            def noise(step: int, k: int = k) -> torch.Tensor:
                return token_noise(request.seed, images_index, k, step, self.config.token_dim).to(model.device)

            token = sample_token(velocity, request.params, k, num_tokens, noise, len(branches))
            token = finalize_token(token, request.params.use_norm)
            sampled.append(token)
            if on_token is not None:
                on_token(k, token)
            if k + 1 < num_tokens:
                embed = model.embed_image_token(token)
                last_hidden = [model.forward_hidden(embed, cache)[:, -1] for cache in caches]

        tokens = torch.stack(sampled, dim=1)
        return ImageTokens(tokens=tokens.cpu(), pixels=self.decode(tokens, grid_h, grid_w).cpu())

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """tokens [n, N, token_dim] -> uint8 images [n, H, W, 3], one image per VAE call.

        One at a time because CPU convolutions round differently with the batch size, and an
        image must not depend on what it was decoded with.
        """
        vae_dtype = next(self.vae.parameters()).dtype
        images = []
        for image_tokens in tokens:
            pixels = decode_image_tokens(
                self.vae,
                self.vae_config,
                image_tokens[None].to(vae_dtype),
                grid_h,
                grid_w,
                self.config.latent_channels,
                self.config.latent_patch_size,
            )
            images.append(pixels_to_uint8(pixels.float())[0])
        return torch.stack(images)


def with_overrides(params: SamplingParams, **overrides) -> SamplingParams:
    """params with every override that is not None applied."""
    return replace(params, **{k: v for k, v in overrides.items() if v is not None})
