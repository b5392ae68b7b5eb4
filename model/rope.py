"""Rotary position embeddings (rotate-half form) with the config's theta and scaling.

Supported `rope_scaling` types: none/"default", "linear", "llama3" and "yarn", computed the way
Hugging Face transformers computes them for Qwen2/Llama checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import ConfigError

SUPPORTED_SCALING = ("default", "linear", "llama3", "yarn")


def _scaling_type(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in SUPPORTED_SCALING:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_SCALING)})")
    return kind


def rope_frequencies(
    head_dim: int, theta: float, rope_scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention scaling applied to cos/sin."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = _scaling_type(rope_scaling)
    if kind == "default":
        return inv_freq, 1.0
    factor = float(rope_scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = int(rope_scaling.get("original_max_position_embeddings", max_position_embeddings))
    if kind == "llama3":
        low_freq_factor = float(rope_scaling["low_freq_factor"])
        high_freq_factor = float(rope_scaling["high_freq_factor"])
        low_freq_wavelen = original / low_freq_factor
        high_freq_wavelen = original / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    # yarn: blend interpolated and extrapolated frequencies with a linear ramp over the dims
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin tables for given positions; not an nn.Module so checkpoints never carry it.

    The frequencies live on the CPU (also when the model is built on the meta device).
    """

    def __init__(self, head_dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int):
        self.inv_freq, self.attention_scaling = rope_frequencies(head_dim, theta, rope_scaling, max_position_embeddings)
        self._on_device: dict[torch.device, torch.Tensor] = {}  # copies, so a CUDA graph never copies from host

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: int [..., T] -> cos, sin [..., T, head_dim] in `dtype` (computed in float32)."""
        inv_freq = self._on_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._on_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B or 1, T, head_dim] -> x rotated, same shape."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
