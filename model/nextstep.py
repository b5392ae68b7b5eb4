"""The NextStep model: decoder backbone, image projectors, flow-matching head, optional gen_pos_embed.

State-dict keys are the published flat names (`embed_tokens.weight`, `layers.{i}...`, `norm.weight`,
`image_in_projector.*`, `image_out_projector.*`, `image_head.net.*`, `gen_pos_embed`).
`lm_head` is never built: image generation does not use it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import NextStepConfig
from .decoder import DecoderLayer, KVCache, RMSNorm
from .layers import Linear
from .head import FlowMatchingHead
from .rope import RotaryEmbedding


class NextStepModel(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.image_in_projector = Linear(config.token_dim, hidden)
        self.image_out_projector = Linear(hidden, hidden)
        self.image_head = FlowMatchingHead(config.token_dim, hidden, config.fm_head_dim, config.fm_head_layers)
        if config.use_gen_pos_embed:
            grid = config.base_image_grid_size
            self.register_buffer("gen_pos_embed", torch.zeros(1, grid * grid, hidden))
        else:
            self.gen_pos_embed = None
        self.rotary = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(
        self,
        token_ids: torch.Tensor,
        image_positions: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings.

        token_ids: [B, T] int; image_positions: [P] int (positions of the image placeholders, in raster
        order, the same for every row); image_tokens: [B, P, token_dim] latent tokens of the input image.
        Returns [B, T, hidden]: embed_tokens everywhere, image_in_projector(token) at the placeholders.
        """
        embeds = self.embed_tokens(token_ids)
        if image_positions is not None and len(image_positions) > 0:
            if image_tokens is None or image_tokens.shape[1] != len(image_positions):
                raise ValueError("image_tokens must hold one latent token per image placeholder")
            embeds[:, image_positions] = self.image_in_projector(image_tokens.to(self.dtype))
        return embeds

    def embed_image_token(self, token: torch.Tensor) -> torch.Tensor:
        """token: [B, token_dim] (a sampled image token) -> [B, 1, hidden] next input embedding."""
        return self.image_in_projector(token.to(self.dtype))[:, None, :]

    def forward_hidden(self, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the decoder over new positions cache.length.. and advance the cache.

        embeds: [B, T, hidden] -> final normed hidden states [B, T, hidden].
        """
        t = embeds.shape[1]
        positions = torch.arange(cache.length, cache.length + t, device=embeds.device)[None]
        cos, sin = self.rotary.cos_sin(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        cache.advance(t)
        return self.norm(x)

    def head_condition(self, hidden: torch.Tensor, token_index: int) -> torch.Tensor:
        """hidden: [B, hidden] last-position states -> head condition c [B, hidden] for image token k."""
        if self.gen_pos_embed is not None:
            if token_index >= self.gen_pos_embed.shape[1]:
                raise ValueError(
                    f"image token {token_index} is beyond gen_pos_embed ({self.gen_pos_embed.shape[1]} positions)"
                )
            hidden = hidden + self.gen_pos_embed[0, token_index].to(hidden.dtype)
        return self.image_out_projector(hidden)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def backbone_parameter_count(model: NextStepModel) -> int:
    """Decoder parameters: embeddings, layers and final norm (what the paper calls the 14B backbone)."""
    return count_parameters(model.embed_tokens) + count_parameters(model.layers) + count_parameters(model.norm)
