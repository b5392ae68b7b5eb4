"""The decoder's parts against independent math: RoPE, GQA attention, RMSNorm, KV-cached decoding."""

import math

import numpy as np
import pytest
import torch

from model.config import ConfigError
from model.decoder import KVCache, RMSNorm, causal_attention
from model.presets import preset_config, random_model
from model.rope import RotaryEmbedding, apply_rotary, rope_frequencies


def test_rope_rotates_each_half_pair_by_position_times_frequency():
    head_dim, theta = 8, 1000.0
    rope = RotaryEmbedding(head_dim, theta, None, 4096)
    positions = torch.tensor([[0, 1, 5, 17]])
    x = torch.randn(1, 2, 4, head_dim)
    cos, sin = rope.cos_sin(positions, torch.float32)
    got = apply_rotary(x, cos, sin).numpy()

    expected = np.empty_like(got)
    half = head_dim // 2
    for h in range(2):
        for t, pos in enumerate(positions[0].tolist()):
            for i in range(half):
                angle = pos * theta ** (-2 * i / head_dim)
                a, b = x[0, h, t, i].item(), x[0, h, t, i + half].item()
                expected[0, h, t, i] = a * math.cos(angle) - b * math.sin(angle)
                expected[0, h, t, i + half] = b * math.cos(angle) + a * math.sin(angle)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_preserves_relative_dot_products():
    rope = RotaryEmbedding(16, 10000.0, None, 4096)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope.cos_sin(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope.cos_sin(torch.tensor([[pk]]), torch.float32)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)


def test_linear_rope_scaling_divides_frequencies():
    base, _ = rope_frequencies(8, 10000.0, None, 4096)
    scaled, attn = rope_frequencies(8, 10000.0, {"type": "linear", "factor": 4.0}, 4096)
    torch.testing.assert_close(scaled, base / 4)
    assert attn == 1.0


def test_llama3_scaling_keeps_high_and_divides_low_frequencies():
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base, _ = rope_frequencies(128, 500000.0, None, 8192)
    scaled, _ = rope_frequencies(128, 500000.0, scaling, 8192)
    assert scaled[0] == base[0]
    assert scaled[-1] == pytest.approx(base[-1].item() / 8)


def test_yarn_scaling_blends_frequencies_and_scales_attention():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    base, _ = rope_frequencies(128, 1e6, None, 131072)
    scaled, attn = rope_frequencies(128, 1e6, scaling, 131072)
    assert attn == pytest.approx(0.1 * math.log(4.0) + 1)
    assert scaled[0] == pytest.approx(base[0].item())
    assert scaled[-1] == pytest.approx(base[-1].item() / 4)


def test_unknown_rope_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="rope_scaling type 'longrope'"):
        rope_frequencies(8, 10000.0, {"type": "longrope", "factor": 2.0}, 4096)


def test_gqa_causal_attention_matches_per_head_loop():
    torch.manual_seed(0)
    b, heads, kv_heads, d, offset, t = 2, 6, 2, 8, 3, 4
    q = torch.randn(b, heads, t, d)
    k = torch.randn(b, kv_heads, offset + t, d)
    v = torch.randn(b, kv_heads, offset + t, d)
    got = causal_attention(q, k, v, query_offset=offset).numpy()

    group = heads // kv_heads
    expected = np.zeros((b, heads, t, d))
    for bi in range(b):
        for h in range(heads):
            kv = h // group
            for i in range(t):
                visible = offset + i + 1
                logits = np.array([q[bi, h, i] @ k[bi, kv, j] for j in range(visible)]) / math.sqrt(d)
                weights = np.exp(logits - logits.max())
                weights /= weights.sum()
                expected[bi, h, i] = sum(weights[j] * v[bi, kv, j].numpy() for j in range(visible))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(6, eps=1e-5)
    norm.weight.data = torch.randn(6)
    x = torch.randn(3, 6)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_cached_decoding_matches_one_full_forward():
    config = preset_config("tiny")
    model = random_model(config, seed=1)
    embeds = torch.randn(2, 9, config.hidden_size)
    with torch.no_grad():
        full = model.forward_hidden(embeds, KVCache(config, 2, 9, "cpu", torch.float32))
        cache = KVCache(config, 2, 9, "cpu", torch.float32)
        pieces = [model.forward_hidden(embeds[:, :5], cache)]
        pieces += [model.forward_hidden(embeds[:, i : i + 1], cache) for i in range(5, 9)]
    # bit-exact on CPU: the engine relies on chunking never changing a hidden state
    assert torch.equal(torch.cat(pieces, dim=1), full)


def test_kv_cache_refuses_to_overflow():
    config = preset_config("tiny")
    model = random_model(config)
    cache = KVCache(config, 1, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        model.forward_hidden(torch.randn(1, 5, config.hidden_size), cache)
