"""The flow-matching head against its formula, written out with numpy."""

import math

import numpy as np
import pytest
import torch

from model.head import FlowMatchingHead, timestep_embedding


def _silu(x):
    return x / (1 + np.exp(-x))


def _linear(module, x):
    return x @ module.weight.detach().numpy().T + module.bias.detach().numpy()


def _layer_norm(x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


def _head_formula(net, x, t, c):
    freqs = np.array([math.exp(-math.log(10000) * i / 128) for i in range(128)])
    t_emb = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=-1)
    t_emb = _linear(net.time_embed.mlp[2], _silu(_linear(net.time_embed.mlp[0], t_emb)))
    y = t_emb + _linear(net.cond_embed, c)
    h = _linear(net.input_proj, x)
    width = h.shape[-1]
    for block in net.res_blocks:
        mod = _linear(block.adaLN_modulation[1], _silu(y))
        shift, scale, gate = mod[:, :width], mod[:, width : 2 * width], mod[:, 2 * width :]
        ln = _layer_norm(h) * block.in_ln.weight.detach().numpy() + block.in_ln.bias.detach().numpy()
        u = ln * (1 + scale) + shift
        u = _linear(block.mlp[2], _silu(_linear(block.mlp[0], u)))
        h = h + gate * u
    mod = _linear(net.final_layer.adaLN_modulation[1], _silu(y))
    shift, scale = mod[:, :width], mod[:, width:]
    return _linear(net.final_layer.linear, _layer_norm(h) * (1 + scale) + shift)


def _random_head(seed=0):
    torch.manual_seed(seed)
    head = FlowMatchingHead(token_dim=64, cond_dim=48, width=32, depth=3)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    return head.double()


def test_timestep_embedding_is_cos_then_sin_of_t_itself():
    t = torch.tensor([0.0, 0.37, 1.0])
    emb = timestep_embedding(t)
    assert emb.shape == (3, 256)
    i = 5
    freq = math.exp(-math.log(10000) * i / 128)
    assert emb[1, i].item() == pytest.approx(math.cos(0.37 * freq), abs=1e-6)
    assert emb[1, 128 + i].item() == pytest.approx(math.sin(0.37 * freq), abs=1e-6)


def test_head_velocity_matches_formula_on_random_inputs():
    head = _random_head()
    x = np.random.default_rng(0).normal(size=(5, 64))
    c = np.random.default_rng(1).normal(size=(5, 48))
    t = np.array([0.0, 0.1, 0.5, 0.9, 0.96])
    got = head.net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).detach().numpy()
    np.testing.assert_allclose(got, _head_formula(head.net, x, t, c), rtol=1e-5, atol=1e-6)


def test_velocity_broadcasts_a_scalar_time_and_returns_float32():
    head = _random_head().float()
    x, c = torch.randn(4, 64), torch.randn(4, 48)
    v = head.velocity(x, 0.25, c)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, head.net(x, torch.full((4,), 0.25), c))


def test_head_state_dict_uses_published_names():
    names = set(FlowMatchingHead(64, 48, 32, 2).state_dict())
    for expected in (
        "net.time_embed.mlp.0.weight",
        "net.time_embed.mlp.2.bias",
        "net.cond_embed.weight",
        "net.input_proj.weight",
        "net.res_blocks.1.in_ln.weight",
        "net.res_blocks.1.in_ln.bias",
        "net.res_blocks.0.mlp.0.weight",
        "net.res_blocks.0.mlp.2.weight",
        "net.res_blocks.0.adaLN_modulation.1.weight",
        "net.final_layer.adaLN_modulation.1.weight",
        "net.final_layer.linear.weight",
    ):
        assert expected in names
    assert not any("norm_final" in n for n in names)
