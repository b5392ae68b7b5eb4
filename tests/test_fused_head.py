"""The fused head kernels against their torch references (Triton under TRITON_INTERPRET=1 on CPU),
the references against the model's own head and samplers, and the fused engine against the reference."""

import pytest
import torch

from kernels import fused_head
from kernels.fused_head import (
    EPILOGUE_BIAS,
    EPILOGUE_BIAS_SILU,
    EPILOGUE_GATED_RESIDUAL,
    FusedHead,
    few_rows_final_update,
    few_rows_linear,
    few_rows_linear_reference,
    guided_update,
    guided_update_reference,
    linear,
    linear_reference,
    ln_modulate,
    ln_modulate_reference,
    residual_ln_modulate,
    residual_ln_modulate_reference,
    silu_,
)
from model.head import FlowMatchingHead
from model.noise import token_noise
from model.sampling import (
    SamplingParams,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
    legacy_final_step,
    legacy_sde_step,
    timesteps,
    update_coefficients,
)

pytest.importorskip("triton")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("m,n,k", [(1, 40, 24), (16, 50, 100), (37, 96, 72), (70, 130, 64)])  # <= 16: the tiny-row tiles
@pytest.mark.parametrize("epilogue", [EPILOGUE_BIAS, EPILOGUE_BIAS_SILU, EPILOGUE_GATED_RESIDUAL])
def test_linear_kernel_matches_reference(m, n, k, epilogue):
    x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    mod = torch.randn(m, 3 * n)
    gate, residual = mod[:, n : 2 * n], torch.randn(m, n)  # gate is a strided column slice, as in the head
    got = linear(x, w, b, epilogue, gate, residual, use_triton=True)
    want = linear_reference(x, w, b, epilogue, gate, residual)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("m,x_rows", [(2, 1), (70, 35)])
def test_linear_kernel_repeats_input_rows_by_index(m, x_rows):
    x, w, b = torch.randn(x_rows, 24), torch.randn(40, 24), torch.randn(40)
    got = linear(x, w, b, EPILOGUE_BIAS_SILU, rows=m, use_triton=True)
    want = linear_reference(x.repeat(m // x_rows, 1), w, b, EPILOGUE_BIAS_SILU)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("norm", [None, "affine", "plain"])
@pytest.mark.parametrize("epilogue", [EPILOGUE_BIAS, EPILOGUE_BIAS_SILU, EPILOGUE_GATED_RESIDUAL])
@pytest.mark.parametrize("m,x_rows", [(1, 1), (3, 3), (4, 2)])
def test_few_rows_kernel_matches_reference(m, x_rows, epilogue, norm):
    k, n = 100, 40
    x, w, b = torch.randn(x_rows, k), torch.randn(n, k), torch.randn(n)
    mod = torch.randn(m, 3 * k)  # shift, scale and gate are strided column slices, as in the head
    gate, residual = mod[:, 2 * k : 2 * k + n], torch.randn(m, n)
    ln = (torch.randn(k), torch.randn(k)) if norm == "affine" else (None, None)
    norm_args = None if norm is None else (mod[:, :k], mod[:, k : 2 * k], *ln)
    if norm_args is not None:
        x = x.repeat(m // x_rows, 1)  # the head normalizes rows it stored, never repeated ones
    rows = m if norm_args is None else None
    got = few_rows_linear(x, w, b, epilogue, gate, residual, rows=rows, norm=norm_args, use_triton=True)
    want = few_rows_linear_reference(x, w, b, epilogue, gate, residual, rows=rows, norm=norm_args)
    assert got.shape == (m, n)
    assert rel(got, want) < 1e-5


def test_few_rows_kernel_refuses_more_rows():
    with pytest.raises(ValueError, match="at most"):
        few_rows_linear(torch.randn(fused_head.FEW_ROWS + 1, 8), torch.randn(4, 8), torch.randn(4), use_triton=True)


def test_linear_reference_is_the_formula():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    gate, res = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(linear_reference(x, w, b), x @ w.t() + b)
    torch.testing.assert_close(linear_reference(x, w, b, EPILOGUE_BIAS_SILU), torch.nn.functional.silu(x @ w.t() + b))
    torch.testing.assert_close(linear_reference(x, w, b, EPILOGUE_GATED_RESIDUAL, gate, res), res + gate * (x @ w.t() + b))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rows,d", [(1, 48), (9, 100)])
def test_ln_modulate_kernel_matches_reference(affine, rows, d):
    h = torch.randn(rows, d) * 3 + 1
    mod = torch.randn(rows, 2 * d)
    w, b = (torch.randn(d), torch.randn(d)) if affine else (None, None)
    got = ln_modulate(h, mod[:, :d], mod[:, d:], w, b, use_triton=True)
    assert rel(got, ln_modulate_reference(h, mod[:, :d], mod[:, d:], w, b)) < 1e-5


@pytest.mark.parametrize("affine", [True, False])
def test_residual_ln_modulate_kernel_matches_reference(affine):
    rows, d = 9, 100
    h, y = torch.randn(rows, d) * 3 + 1, torch.randn(rows, d)
    mod = torch.randn(rows, 3 * d)
    gate, shift, scale = mod.split(d, dim=1)  # strided column slices, as in the head
    w, b = (torch.randn(d), torch.randn(d)) if affine else (None, None)
    h_got, u_got = residual_ln_modulate(h, gate, y, shift, scale, w, b, use_triton=True)
    h_want, u_want = residual_ln_modulate_reference(h, gate, y, shift, scale, w, b)
    assert rel(h_got, h_want) < 1e-6 and rel(u_got, u_want) < 1e-5
    torch.testing.assert_close(h_want, h + gate * y)


@pytest.mark.parametrize("triton_kernel", [True, False])
def test_silu_in_place_matches_torch(triton_kernel, monkeypatch):
    monkeypatch.setattr(fused_head, "MANY_ROWS_PDL", triton_kernel)  # the Triton kernel only with it
    x = torch.randn(7, 300) * 4
    want = torch.nn.functional.silu(x)
    got = silu_(x, use_triton=True)
    assert got.data_ptr() == x.data_ptr() and rel(got, want) < 1e-6


def _counters(b):
    return (torch.randint(0, 2**62, (b,)), torch.randint(0, 5, (b,)), torch.randint(0, 1000, (b,)))


@pytest.mark.parametrize("slots", [2, 3])
def test_guided_update_kernel_matches_reference_with_in_kernel_noise(slots):
    b, d = 6, 64
    v, x = torch.randn(slots, b, d), torch.randn(b, d)
    cfg, cfg_img = torch.rand(b) * 7, torch.rand(b) * 3
    rescale = torch.tensor([True, False] * (b // 2))
    seed, image, token = _counters(b)
    got = guided_update(v, x, cfg, cfg_img, rescale, seed, image, token, 7, 0.9, 0.3, 0.5, use_triton=True)
    z = token_noise(seed, image, token, 7, d)
    assert rel(got, guided_update_reference(v, x, cfg, cfg_img, rescale, z, 0.9, 0.3, 0.5)) < 1e-5


def test_initial_noise_is_the_reference_token_noise():
    b, d = 5, 64
    seed, image, token = _counters(b)
    ones = torch.ones(b)
    got = guided_update(None, torch.zeros(b, d), ones, ones, ones.bool(), seed, image, token, 0, 0.0, 0.0, 1.0, use_triton=True)
    assert rel(got, token_noise(seed, image, token, 0, d)) < 1e-6


@pytest.mark.parametrize("sampler", ["legacy-sde", "sde", "cps", "ode"])
@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_update_coefficients_reproduce_the_step_functions(sampler, shift):
    params = SamplingParams(sampler=sampler, num_steps=5, timesteps_shift=shift, guidance_scale=1.0, use_norm=False)
    grid = timesteps(params).tolist()
    x, v, z = torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 64, dtype=torch.float64)
    for i in range(5):
        a, b, c = update_coefficients(params, i)
        if sampler == "legacy-sde":
            want = legacy_final_step(x, v) if i == 4 else legacy_sde_step(x, v, grid[i], grid[i + 1], z)
        elif sampler == "ode":
            want = flow_ode_step(x, v, grid[i], grid[i + 1])
        elif sampler == "sde":
            want = flow_sde_step(x, v, grid[i], grid[i + 1], z, sigma_max=grid[4])
        else:
            want = flow_cps_step(x, v, grid[i], grid[i + 1], z)
        torch.testing.assert_close(a * x + b * v + c * z, want, rtol=1e-12, atol=1e-12)


# MANY_ROWS_PDL on the cuBLAS path: SiLU as the Triton kernel
@pytest.mark.parametrize("blocks,many_rows_pdl", [("few_rows", False), ("triton", False), ("cublas", False), ("cublas", True)])
@pytest.mark.parametrize("modulation_gemm", fused_head.MODULATION_GEMMS)
def test_fused_velocity_matches_the_head_module(modulation_gemm, blocks, many_rows_pdl, monkeypatch):
    monkeypatch.setattr(fused_head, "MODULATION_GEMM", modulation_gemm)
    monkeypatch.setattr(fused_head, "MANY_ROWS_PDL", many_rows_pdl)
    monkeypatch.setattr(fused_head, "FEW_ROWS", 16 if blocks == "few_rows" else 0)
    monkeypatch.setattr(fused_head, "CUBLAS_BLOCKS_MIN_ROWS", 1 if blocks == "cublas" else 1 << 30)
    torch.manual_seed(0)
    head = FlowMatchingHead(token_dim=64, cond_dim=48, width=32, depth=3)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    fused = FusedHead(head.net, use_triton=True)
    x, c = torch.randn(7, 64), torch.randn(14, 48)  # two conditions per x row, as with guidance
    t = torch.tensor([0.9, 0.37])
    with torch.no_grad():
        mods = fused.modulations(fused.time_embedding(t), fused.cond_embedding(c))
        got = fused.velocity(x, mods[1])
        want = head.velocity(x.repeat(2, 1), 0.37, c)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("chunk_rows", [0, 4096])
def test_fused_engine_matches_the_reference_generator(chunk_rows, monkeypatch):
    monkeypatch.setattr(fused_head, "MODULATION_CHUNK_ROWS", chunk_rows)  # modulations step by step, or all steps at once
    from model.bundle import load_bundle
    from server.engine.engine import EngineConfig
    from server.engine.events import EngineRequest
    from tests.test_engine import assert_tokens_close_to_reference, edit, t2i

    specs = [
        EngineRequest("cfg", t2i(n=2, rescale_guidance=True, seed=2, num_steps=3)),
        EngineRequest("edit", edit("red", seed=3, num_steps=3)),
        EngineRequest("sde", t2i(sampler="sde", use_norm=False, seed=4, num_steps=3)),
    ]
    assert_tokens_close_to_reference(load_bundle("tiny", seed=0), specs, EngineConfig(fused_head=True))


@pytest.mark.parametrize("slots,images", [(2, 1), (2, 2), (3, 1)])
def test_sampling_step_with_the_update_in_the_final_layer_matches_velocity_then_update(slots, images, monkeypatch):
    torch.manual_seed(slots * 10 + images)
    head = FlowMatchingHead(token_dim=64, cond_dim=48, width=32, depth=2)
    for p in head.parameters():
        p.data.normal_(0, 0.3)
    fused = FusedHead(head.net, use_triton=True)
    x, c = torch.randn(images, 64), torch.randn(slots * images, 48)
    scales = (torch.rand(images) * 5, torch.rand(images) * 3, torch.zeros(images, dtype=torch.bool))
    counters = (torch.randint(0, 2**40, (images,)), torch.arange(images), torch.randint(0, 1000, (images,)))
    with torch.no_grad():
        mod = fused.modulations(fused.time_embedding(torch.tensor([0.6])), fused.cond_embedding(c))[0]
        got = fused.sampling_step(x, mod, slots, scales, counters, 5, 0.9, 0.3, 0.5, rescale=False)
        v = fused.velocity(x, mod).view(slots, images, -1)
        want = guided_update(v, x, *scales, *counters, 5, 0.9, 0.3, 0.5, use_triton=True)
        args = (*fused._final_layer_few_rows(x, mod), x, slots)
        reference = few_rows_final_update(*args, *scales[:2], *counters, 5, 0.9, 0.3, 0.5, use_triton=False)
        monkeypatch.setattr(fused_head, "FEW_ROWS", 0)  # the same step with a separate update kernel
        separate = fused.sampling_step(x, mod, slots, scales, counters, 5, 0.9, 0.3, 0.5, rescale=False)
    assert rel(got, want) < 1e-6
    assert rel(reference, want) < 1e-6
    assert rel(separate, want) < 1e-6
