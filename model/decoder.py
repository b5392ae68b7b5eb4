"""The causal decoder (Qwen2 shape): RMSNorm, GQA attention with RoPE and q/k/v biases, SwiGLU MLP.

This is the plain reference: attention is written out (float32 softmax) over a contiguous
KV cache, one tensor per layer, so it is easy to check by eye.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import NextStepConfig
from .layers import Linear, batch_invariant_matmul
from .rope import apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]; normalised in float32 like the published code."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class KVCache:
    """Contiguous per-layer key/value storage for B sequences of equal length."""

    def __init__(self, config: NextStepConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.capacity = capacity
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, kv_heads, T, head_dim] for positions length..length+T -> all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_offset: int) -> torch.Tensor:
    """Grouped-query causal attention, written out.

    q: [B, heads, T, d]; k, v: [B, kv_heads, S, d] where S = query_offset + T (query i sits at
    absolute position query_offset + i and sees keys 0..query_offset+i). Returns [B, heads, T, d].
    On CPU each query row attends over exactly its visible keys, so its result is the same however
    the sequence was split into chunks (see layers.py); elsewhere one masked product does it all.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    t, s = q.shape[2], k.shape[2]
    scale = math.sqrt(q.shape[-1])
    if q.device.type == "cpu":
        rows = []
        for i in range(t):
            visible = query_offset + i + 1
            scores = batch_invariant_matmul(q[:, :, i : i + 1].float(), k[:, :, :visible].transpose(-1, -2)) / scale
            rows.append(batch_invariant_matmul(scores.softmax(dim=-1), v[:, :, :visible]))
        return torch.cat(rows, dim=2).to(q.dtype)
    scores = (q.float() @ k.transpose(-1, -2)) / scale
    query_pos = torch.arange(t, device=q.device)[:, None] + query_offset
    key_pos = torch.arange(s, device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.o_attention_bias)

    def forward(self, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        """x: [B, T, hidden]; cos/sin: [1, T, head_dim] -> [B, T, hidden]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        keys, values = cache.append(layer, k, v)
        out = causal_attention(q, keys, values, query_offset=cache.length)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NextStepConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))
