"""Samplers, timestep grids, guidance schedules and guidance combination, against written-out math."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from model.config import FAMILY_V1, FAMILY_V11
from model.sampling import (
    GUIDANCE_SCHEDULES,
    SAMPLERS,
    SamplingError,
    SamplingParams,
    branch_count,
    combine_guidance,
    finalize_token,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
    guidance_scales_at,
    legacy_final_step,
    legacy_sde_step,
    published_defaults,
    sample_token,
    timesteps,
)

B, D = 3, 8


def params(**overrides) -> SamplingParams:
    base = dict(sampler="sde", num_steps=4, timesteps_shift=1.0, guidance_scale=1.0, use_norm=False)
    return SamplingParams(**(base | overrides))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def elementwise(fn, *arrays: torch.Tensor) -> np.ndarray:
    """Apply a scalar formula to every element, in float64 Python arithmetic."""
    flat = [a.double().numpy().ravel() for a in arrays]
    out = np.array([fn(*values) for values in zip(*flat, strict=True)])
    return out.reshape(arrays[0].shape)


# ---- parameters ----------------------------------------------------------------------------


def test_sampler_and_schedule_names():
    assert SAMPLERS == ("legacy-sde", "sde", "cps", "ode")
    assert GUIDANCE_SCHEDULES == ("constant", "linear")


def test_published_defaults_follow_the_checkpoint_table():
    large = published_defaults(FAMILY_V1, edit=False)
    edit = published_defaults(FAMILY_V1, edit=True)
    v11 = published_defaults(FAMILY_V11, edit=False)
    rows = [
        (large, 7.5, 1.0, 50, 1.0, True, "legacy-sde"),
        (edit, 7.5, 2.0, 50, 3.2, True, "legacy-sde"),
        (v11, 7.5, 1.0, 28, 1.0, False, "sde"),
    ]
    for p, cfg, cfg_img, steps, shift, use_norm, sampler in rows:
        assert (p.guidance_scale, p.image_guidance_scale, p.num_steps) == (cfg, cfg_img, steps)
        assert (p.timesteps_shift, p.use_norm, p.sampler) == (shift, use_norm, sampler)
        assert p.guidance_schedule == "constant" and p.rescale_guidance is False


def test_published_defaults_reject_v11_edits_and_unknown_families():
    with pytest.raises(SamplingError, match="editing"):
        published_defaults(FAMILY_V11, edit=True)
    with pytest.raises(SamplingError, match="family"):
        published_defaults("nextstep-9", edit=False)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(sampler="euler"), "sampler"),
        (dict(guidance_schedule="cosine"), "guidance_schedule"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale=-0.5), "guidance_scale"),
        (dict(image_guidance_scale=float("nan")), "image_guidance_scale"),
        (dict(image_guidance_scale=-1.0), "image_guidance_scale"),
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=2.5), "num_steps"),
        (dict(sampler="legacy-sde", num_steps=1), "num_steps"),
        (dict(timesteps_shift=0.0), "timesteps_shift"),
        (dict(timesteps_shift=float("inf")), "timesteps_shift"),
        (dict(timesteps_shift=float("nan")), "timesteps_shift"),
        (dict(use_norm="yes"), "use_norm"),
    ],
)
def test_invalid_params_raise_naming_the_field(overrides, field):
    with pytest.raises(SamplingError, match=field):
        params(**overrides)


def test_guidance_scales_from_zero_up_and_one_step_flow_are_valid():
    params(guidance_scale=0.0, image_guidance_scale=0.0).validate()
    params(guidance_scale=1e6, num_steps=1).validate()
    params(sampler="legacy-sde", num_steps=2, timesteps_shift=0.1).validate()


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        params().num_steps = 5


def test_sampling_error_is_a_value_error():
    assert issubclass(SamplingError, ValueError)


# ---- timestep grids --------------------------------------------------------------------------


def test_legacy_grid_by_hand_with_shift_3_2():
    grid = timesteps(params(sampler="legacy-sde", num_steps=5, timesteps_shift=3.2))
    # linspace(0, 0.96, 5) = 0, .24, .48, .72, .96; shift(t) = t / (3.2 - 2.2 t)
    expected = [0.0, 0.24 / 2.672, 0.48 / 2.144, 0.72 / 1.616, 0.96 / 1.088]
    assert grid.dtype == torch.float64
    np.testing.assert_allclose(grid.numpy(), expected, rtol=0, atol=1e-12)
    assert grid[-1].item() == pytest.approx(0.8823529411764706, abs=1e-12)


def test_flow_grid_by_hand_with_shift_3_2_ends_at_one():
    grid = timesteps(params(sampler="cps", num_steps=4, timesteps_shift=3.2))
    # linspace(0, 1, 5)[:-1] = 0, .25, .5, .75, shifted, then 1
    expected = [0.0, 0.25 / 2.65, 0.5 / 2.1, 0.75 / 1.55, 1.0]
    assert grid.dtype == torch.float64
    np.testing.assert_allclose(grid.numpy(), expected, rtol=0, atol=1e-12)


def test_shift_one_leaves_the_grids_uniform():
    np.testing.assert_allclose(timesteps(params(sampler="legacy-sde", num_steps=3)).numpy(), [0.0, 0.48, 0.96])
    np.testing.assert_allclose(timesteps(params(sampler="ode", num_steps=2)).numpy(), [0.0, 0.5, 1.0])


# ---- guidance --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, cfg_img, has_image, expected",
    [
        (7.5, 2.0, True, 3),
        (1.0, 2.0, True, 3),
        (7.5, 1.0, True, 2),
        (7.5, 2.0, False, 2),
        (1.0, 2.0, False, 1),
        (1.0, 1.0, True, 1),
        (0.5, 0.5, True, 1),
    ],
)
def test_branch_count_follows_the_requested_scales(cfg, cfg_img, has_image, expected):
    p = params(guidance_scale=cfg, image_guidance_scale=cfg_img)
    assert branch_count(p, has_image=has_image) == expected


def test_constant_schedule_returns_the_scales_at_every_token():
    p = params(guidance_scale=7.5, image_guidance_scale=2.0)
    assert all(guidance_scales_at(p, k, 10) == (7.5, 2.0) for k in range(10))


def test_legacy_linear_schedule_falls_from_the_scale_towards_one():
    p = params(sampler="legacy-sde", guidance_scale=7.5, image_guidance_scale=2.0, guidance_schedule="linear")
    assert guidance_scales_at(p, 0, 100) == pytest.approx((7.5, 2.0))
    assert guidance_scales_at(p, 50, 100) == pytest.approx((4.25, 1.5))
    assert guidance_scales_at(p, 99, 100) == pytest.approx((1.065, 1.01))


def test_flow_linear_schedule_rises_from_half_the_scale():
    p = params(sampler="sde", guidance_scale=7.5, image_guidance_scale=2.0, guidance_schedule="linear")
    # max(s / 2, 1 + (s - 1) k / N)
    assert guidance_scales_at(p, 0, 100) == pytest.approx((3.75, 1.0))
    assert guidance_scales_at(p, 50, 100) == pytest.approx((4.25, 1.5))
    assert guidance_scales_at(p, 99, 100) == pytest.approx((7.435, 1.99))


def test_flow_linear_schedule_keeps_small_scales_at_least_one():
    p = params(sampler="ode", guidance_scale=1.5, guidance_schedule="linear")
    assert guidance_scales_at(p, 0, 4)[0] == pytest.approx(1.0)
    assert guidance_scales_at(p, 0, 4)[1] == pytest.approx(1.0)


def test_schedule_rejects_token_index_outside_the_image():
    with pytest.raises(SamplingError, match="token index"):
        guidance_scales_at(params(), 10, 10)
    with pytest.raises(SamplingError, match="num_tokens"):
        guidance_scales_at(params(), 0, 0)


def test_one_branch_passes_the_velocity_through():
    v = randn(1, B, D)
    assert torch.equal(combine_guidance(v, 7.5, 2.0, rescale=False), v[0])


def test_two_branches_extrapolate_from_uncond_towards_cond():
    v = randn(2, B, D)
    expected = elementwise(lambda c, u: u + 3.0 * (c - u), v[0], v[1])
    np.testing.assert_allclose(combine_guidance(v, 3.0, 9.0, rescale=False).numpy(), expected, atol=1e-5)


def test_three_branches_combine_image_and_text_guidance():
    v = randn(3, B, D)
    expected = elementwise(lambda c, ui, un: un + 2.0 * (ui - un) + 7.5 * (c - ui), v[0], v[1], v[2])
    np.testing.assert_allclose(combine_guidance(v, 7.5, 2.0, rescale=False).numpy(), expected, atol=1e-5)


def test_rescale_caps_each_row_norm_at_the_cond_norm():
    v = randn(2, B, D, seed=3)
    v[1, 0] = v[0, 0] * 0.5  # row 0: guided = 2 v_c, longer than v_c
    v[1, 1] = v[0, 1] * 1.5  # row 1: guided = v_c / 2, shorter than v_c: untouched
    got = combine_guidance(v, 2.0, 1.0, rescale=True).numpy()
    for row in range(B):
        cond = v[0, row].double().numpy()
        guided = v[1, row].double().numpy() + 2.0 * (cond - v[1, row].double().numpy())
        factor = min(1.0, math.sqrt((cond**2).sum()) / (math.sqrt((guided**2).sum()) + 1e-6))
        np.testing.assert_allclose(got[row], guided * factor, atol=1e-5)
    assert np.linalg.norm(got[0]) == pytest.approx(np.linalg.norm(v[0, 0].numpy()), rel=1e-5)
    np.testing.assert_allclose(got[1], 0.5 * v[0, 1].numpy(), atol=1e-6)


def test_combine_rejects_four_branches():
    with pytest.raises(SamplingError, match="shape"):
        combine_guidance(randn(4, B, D), 1.0, 1.0, rescale=False)


# ---- update rules ----------------------------------------------------------------------------


def test_legacy_sde_step_per_element():
    x, v, z = randn(B, D, seed=1), randn(B, D, seed=2), randn(B, D, seed=3)
    t, t_next = 0.3, 0.45

    def reference(xe, ve, ze):
        dt = t_next - t
        return xe + ((1 + t) * ve - xe) * dt + math.sqrt(2 * (1 - t) * dt) * ze

    got = legacy_sde_step(x, v, t, t_next, z)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), elementwise(reference, x, v, z), atol=1e-5)


def test_legacy_final_step_moves_0_04_along_the_velocity_without_noise():
    x, v = randn(B, D, seed=1), randn(B, D, seed=2)
    np.testing.assert_allclose(legacy_final_step(x, v).numpy(), elementwise(lambda a, b: a + 0.04 * b, x, v), atol=1e-6)


def test_flow_ode_step_per_element():
    x, v = randn(B, D, seed=1), randn(B, D, seed=2)
    t, t_next = 0.2, 0.5
    expected = elementwise(lambda xe, ve: xe + ve * (t_next - t), x, v)
    np.testing.assert_allclose(flow_ode_step(x, v, t, t_next).numpy(), expected, atol=1e-5)


def flow_sde_reference(xe, ve, ze, t, t_next, sigma_max):
    noise_est, data_est = xe - ve * t, xe + ve * (1 - t)
    sigma, dt = 1 - t, t_next - t
    denominator = 1 - sigma_max if t == 0 else t
    std = 0.8 * math.sqrt(sigma / denominator)
    mean = noise_est * (1 - t_next) + data_est * t_next - std * std * dt / (2 * sigma) * noise_est
    return mean + std * math.sqrt(dt) * ze


def test_flow_sde_step_per_element():
    x, v, z = randn(B, D, seed=1), randn(B, D, seed=2), randn(B, D, seed=3)
    t, t_next, sigma_max = 0.4, 0.6, 0.75
    expected = elementwise(lambda xe, ve, ze: flow_sde_reference(xe, ve, ze, t, t_next, sigma_max), x, v, z)
    np.testing.assert_allclose(flow_sde_step(x, v, t, t_next, z, sigma_max).numpy(), expected, atol=1e-5)


def test_flow_sde_first_step_uses_sigma_max_where_sigma_is_one():
    x, v, z = randn(B, D, seed=1), randn(B, D, seed=2), randn(B, D, seed=3)
    t_next, sigma_max = 0.25, 0.75
    expected = elementwise(lambda xe, ve, ze: flow_sde_reference(xe, ve, ze, 0.0, t_next, sigma_max), x, v, z)
    got = flow_sde_step(x, v, 0.0, t_next, z, sigma_max)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    # with x = v = 0 only the noise term is left: std = 0.8 * sqrt(1 / (1 - sigma_max)) = 1.6
    noise_only = flow_sde_step(torch.zeros(B, D), torch.zeros(B, D), 0.0, t_next, z, sigma_max)
    np.testing.assert_allclose(noise_only.numpy(), (1.6 * 0.5 * z).numpy(), atol=1e-6)


def test_flow_cps_step_per_element_and_its_noise_std():
    x, v, z = randn(B, D, seed=1), randn(B, D, seed=2), randn(B, D, seed=3)
    t, t_next = 0.3, 0.7
    std = 0.3 * math.sin(0.4 * math.pi)

    def reference(xe, ve, ze):
        noise_est, data_est = xe - ve * t, xe + ve * (1 - t)
        return noise_est * math.sqrt(0.3**2 - std**2) + data_est * t_next + std * ze

    np.testing.assert_allclose(flow_cps_step(x, v, t, t_next, z).numpy(), elementwise(reference, x, v, z), atol=1e-5)
    noise_only = flow_cps_step(torch.zeros(B, D), torch.zeros(B, D), t, t_next, z)
    np.testing.assert_allclose(noise_only.numpy(), (std * z).numpy(), atol=1e-6)


# ---- the sampling loop -----------------------------------------------------------------------


class Recorder:
    """A velocity_fn and noise_fn pair that logs every call."""

    def __init__(self, num_branches: int, velocity):
        self.num_branches, self.velocity = num_branches, velocity
        self.times: list[float] = []
        self.steps: list[int] = []

    def velocity_fn(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.times.append(t)
        return torch.stack([self.velocity(x, t, b) for b in range(self.num_branches)])

    def noise_fn(self, step: int) -> torch.Tensor:
        self.steps.append(step)
        return randn(B, D, seed=100 + step)


@pytest.mark.parametrize(
    "sampler, expected_steps",
    [("legacy-sde", [0, 1, 2, 3, 4]), ("sde", [0, 1, 2, 3, 4, 5]), ("cps", [0, 1, 2, 3, 4, 5]), ("ode", [0])],
)
def test_sample_token_draws_the_documented_noise_steps_and_times(sampler, expected_steps):
    p = params(sampler=sampler, num_steps=5, timesteps_shift=3.2)
    rec = Recorder(1, lambda x, t, b: -x)
    sample_token(rec.velocity_fn, p, 0, 16, rec.noise_fn, num_branches=1)
    assert rec.steps == expected_steps
    grid = timesteps(p).tolist()
    assert rec.times == (grid if sampler == "legacy-sde" else grid[:-1])


@pytest.mark.parametrize("sampler, shift", [("legacy-sde", 1.0), ("ode", 3.2), ("cps", 3.2)])
def test_samplers_land_on_the_data_point_of_a_point_mass_flow(sampler, shift):
    # For data concentrated at one point d the exact velocity is (d - x) / (1 - t). Legacy
    # reaches t = 1 only unshifted: its last 0.04 step starts from shift(0.96).
    data = randn(B, D, seed=7)
    rec = Recorder(1, lambda x, t, b: (data - x) / (1.0 - t))
    p = params(sampler=sampler, num_steps=6, timesteps_shift=shift)
    out = sample_token(rec.velocity_fn, p, 0, 16, rec.noise_fn, num_branches=1)
    torch.testing.assert_close(out, data, atol=1e-5, rtol=0)


def test_ode_with_a_constant_velocity_integrates_noise_to_data_exactly():
    noise, data = randn(B, D, seed=100), randn(B, D, seed=8)  # step 0 of Recorder.noise_fn is `noise`
    rec = Recorder(2, lambda x, t, b: data - noise)
    p = params(sampler="ode", num_steps=7, timesteps_shift=2.0, guidance_scale=4.0)
    out = sample_token(rec.velocity_fn, p, 0, 16, rec.noise_fn, num_branches=2)
    torch.testing.assert_close(out, data, atol=1e-5, rtol=0)


def test_sample_token_follows_the_hand_unrolled_guided_sde():
    weights = randn(2, D, D, seed=9) * 0.3
    p = params(sampler="sde", num_steps=3, guidance_scale=5.0, guidance_schedule="linear", rescale_guidance=True)
    rec = Recorder(2, lambda x, t, b: x @ weights[b] + t)
    out = sample_token(rec.velocity_fn, p, 12, 16, rec.noise_fn, num_branches=2)

    cfg = max(2.5, 1 + 4.0 * 12 / 16)
    grid = [0.0, 1 / 3, 2 / 3, 1.0]
    x = randn(B, D, seed=100).double().numpy()
    w = weights.double().numpy()
    for i in range(3):
        t, t_next = grid[i], grid[i + 1]
        cond, uncond = x @ w[0] + t, x @ w[1] + t
        v = uncond + cfg * (cond - uncond)
        v *= np.minimum(1.0, np.linalg.norm(cond, axis=1) / (np.linalg.norm(v, axis=1) + 1e-6))[:, None]
        z = randn(B, D, seed=100 + i + 1).double().numpy()
        x = flow_sde_reference(x, v, z, t, t_next, sigma_max=2 / 3)  # numpy arrays broadcast through
    np.testing.assert_allclose(out.numpy(), x, atol=1e-4)


def test_bf16_velocities_are_combined_and_integrated_in_float32():
    rec = Recorder(2, lambda x, t, b: (x * (0.5 + b)).to(torch.bfloat16))
    p = params(sampler="ode", num_steps=2, guidance_scale=3.0)
    out = sample_token(rec.velocity_fn, p, 0, 4, rec.noise_fn, num_branches=2)
    assert out.dtype == torch.float32


def test_sample_token_rejects_a_velocity_with_the_wrong_branch_count():
    rec = Recorder(1, lambda x, t, b: x)
    with pytest.raises(SamplingError, match="velocity_fn returned shape"):
        sample_token(rec.velocity_fn, params(guidance_scale=2.0), 0, 4, rec.noise_fn, num_branches=2)


def test_finalize_token_layer_normalises_each_row_only_when_asked():
    x = randn(B, D, seed=5) * 3 + 1
    assert torch.equal(finalize_token(x, use_norm=False), x)
    rows = x.double().numpy()
    expected = (rows - rows.mean(1, keepdims=True)) / np.sqrt(rows.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(finalize_token(x, use_norm=True).numpy(), expected, atol=1e-5)
