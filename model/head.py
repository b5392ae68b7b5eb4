"""The flow-matching head (`image_head.net`): an adaLN MLP that predicts a token's velocity.

Weight names follow the published checkpoints: `time_embed.mlp.{0,2}`, `cond_embed`,
`input_proj`, `res_blocks.{j}.{in_ln,mlp.0,mlp.2,adaLN_modulation.1}`,
`final_layer.{adaLN_modulation.1,linear}` (norm_final has no weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Linear

TIME_FREQUENCY_DIM = 256


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQUENCY_DIM) -> torch.Tensor:
    """t: [B] float in [0, 1] -> [B, dim] float32 = [cos(t * f_i), sin(t * f_i)], f_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(Linear(TIME_FREQUENCY_DIM, width), nn.SiLU(), Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: [B] -> [B, width] in the module's dtype."""
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(Linear(width, width), nn.SiLU(), Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """h, y: [B, width] -> [B, width]."""
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        u = self.mlp(modulate(self.in_ln(h), shift, scale))
        return h + gate * u


class FinalLayer(nn.Module):
    def __init__(self, width: int, token_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = Linear(width, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(width, 2 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class FlowMatchingNet(nn.Module):
    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = Linear(cond_dim, width)
        self.input_proj = Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [B, token_dim], t: [B], c: [B, cond_dim] -> velocity [B, token_dim] (module dtype)."""
        dtype = self.input_proj.weight.dtype
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        h = self.input_proj(x.to(dtype))
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class FlowMatchingHead(nn.Module):
    """Holds `net` so the state-dict keys read `image_head.net.*` as published."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.net = FlowMatchingNet(token_dim, cond_dim, width, depth)

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: [B, token_dim] float32, t: scalar or [B], c: [B, cond_dim] -> float32 velocity [B, token_dim]."""
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)  # no host copy: graph-safe
        t = t.to(torch.float32).expand(x.shape[0])
        return self.net(x, t, c).float()
