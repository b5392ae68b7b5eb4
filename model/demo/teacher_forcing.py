"""Teacher-forced training of a NextStepModel: whole sequences at once, through its own weights.

The reference forward (`NextStepModel.forward_hidden`) runs one query row at a time in fixed
8-row matrix blocks so that inference is batch invariant on CPU; that is far too slow to train
with. Training uses the same modules and weights with plain batched products instead:
`teacher_forced_hidden` is the same function as the reference forward (tests check it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.layers import Linear
from model.nextstep import NextStepModel
from model.rope import apply_rotary


@contextlib.contextmanager
def plain_linears(module: nn.Module) -> Iterator[None]:
    """Inside the block every model.layers.Linear of `module` computes as torch's nn.Linear.

    Same weights, same function; only the CPU blocking that makes inference batch invariant is skipped.
    """
    swapped = [m for m in module.modules() if type(m) is Linear]
    for m in swapped:
        m.__class__ = nn.Linear
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = Linear


def teacher_forced_hidden(model: NextStepModel, embeds: torch.Tensor) -> torch.Tensor:
    """embeds: [B, T, hidden] (right-padded sequences, positions from 0) -> final normed hidden [B, T, hidden].

    Causal attention, so padding after a sequence's end never changes its positions' states.
    """
    config = model.config
    b, t, _ = embeds.shape
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    cos, sin = model.rotary.cos_sin(torch.arange(t, device=embeds.device)[None], embeds.dtype)
    x = embeds
    with plain_linears(model):
        for layer in model.layers:
            attn = layer.self_attn
            normed = layer.input_layernorm(x)
            q = attn.q_proj(normed).view(b, t, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(b, t, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(b, t, kv_heads, head_dim).transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            group = heads // kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            with sdpa_kernel(SDPBackend.MATH):  # the one backend whose backward is deterministic on GPU
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(b, t, heads * head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)


def teacher_forced_embeds(
    model: NextStepModel, token_ids: torch.Tensor, image_mask: torch.Tensor, image_values: torch.Tensor
) -> torch.Tensor:
    """token_ids: [B, T] int; image_mask: [B, T] bool; image_values: [B, T, token_dim] float
    -> [B, T, hidden]: image_in_projector(value) where image_mask, embed_tokens(id) elsewhere."""
    with plain_linears(model):
        projected = model.image_in_projector(image_values)
    return torch.where(image_mask[..., None], projected, model.embed_tokens(token_ids))


def flow_matching_loss(
    model: NextStepModel, conditions: torch.Tensor, targets: torch.Tensor, repeats: int, generator: torch.Generator
) -> torch.Tensor:
    """The head's flow-matching loss, averaged: velocity target x1 - x0 at x_t = t x1 + (1 - t) x0.

    conditions: [M, hidden] head conditions c; targets: [M, token_dim] clean tokens x1. Each target is
    noised `repeats` times (t ~ U(0, 1), x0 ~ N(0, I)): the head is cheap next to the decoder pass.
    `generator` may live on any device; the draws are moved to the targets' device.
    """
    c = conditions.repeat(repeats, 1)
    x1 = targets.repeat(repeats, 1)
    t = torch.rand(x1.shape[0], generator=generator, device=generator.device).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator, device=generator.device).to(x1.device)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    with plain_linears(model):
        velocity = model.image_head.net(xt, t, c)
    return F.mse_loss(velocity, x1 - x0)
