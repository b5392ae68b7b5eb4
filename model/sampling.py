"""Samplers and guidance for the flow-matching head: one image token from noise to data.

Two code bases, two sampler families (t runs from noise at 0 to data at 1):
- "legacy-sde": NextStep-1's Euler-Maruyama SDE with a final deterministic 0.04 step;
- "sde", "cps", "ode": NextStep-1.1's flow samplers on a grid that ends at t = 1.
The linear guidance schedule follows the code base of the chosen sampler. All update
rules are float32 tensor arithmetic with float64 scalar coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import FAMILY_V1, FAMILY_V11

SAMPLERS = ("legacy-sde", "sde", "cps", "ode")
GUIDANCE_SCHEDULES = ("constant", "linear")
FLOW_SAMPLERS = ("sde", "cps", "ode")

LEGACY_LAST_STEP_SIZE = 0.04
FLOW_NOISE_LEVEL = 0.8
RESCALE_EPS = 1e-6
TOKEN_NORM_EPS = 1e-6


class SamplingError(ValueError):
    """Sampling parameters or inputs the samplers cannot use."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples its image tokens; validated on construction."""

    sampler: str
    num_steps: int
    timesteps_shift: float
    guidance_scale: float  # cfg: text guidance
    use_norm: bool  # layer-normalise each sampled token (NextStep-1)
    image_guidance_scale: float = 1.0  # cfg_img: image guidance, edits only
    guidance_schedule: str = "constant"
    rescale_guidance: bool = False  # NextStep-1.1's optional guided-velocity rescale

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SamplingError naming the first field that no sampler can use."""
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise SamplingError(
                f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}; got {self.guidance_schedule!r}"
            )
        min_steps = 2 if self.sampler == "legacy-sde" else 1
        if not _is_int(self.num_steps) or self.num_steps < min_steps:
            raise SamplingError(
                f"num_steps must be an integer >= {min_steps} for {self.sampler}; got {self.num_steps!r}"
            )
        if not _is_finite_real(self.timesteps_shift) or self.timesteps_shift <= 0:
            raise SamplingError(f"timesteps_shift must be a finite number > 0; got {self.timesteps_shift!r}")
        for name in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, name)
            if not _is_finite_real(value) or value < 0:
                raise SamplingError(f"{name} must be a finite number >= 0; got {value!r}")
        for name in ("use_norm", "rescale_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false; got {getattr(self, name)!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def published_defaults(family: str, edit: bool) -> SamplingParams:
    """The sampling settings each published checkpoint was shipped with."""
    if family == FAMILY_V1 and not edit:  # NextStep-1-Large
        return SamplingParams(
            sampler="legacy-sde", num_steps=50, timesteps_shift=1.0, guidance_scale=7.5, use_norm=True
        )
    if family == FAMILY_V1 and edit:  # NextStep-1-Large-Edit
        return SamplingParams(
            sampler="legacy-sde",
            num_steps=50,
            timesteps_shift=3.2,
            guidance_scale=7.5,
            image_guidance_scale=2.0,
            use_norm=True,
        )
    if family == FAMILY_V11 and not edit:  # NextStep-1.1, 28 steps as on its Hugging Face card
        return SamplingParams(sampler="sde", num_steps=28, timesteps_shift=1.0, guidance_scale=7.5, use_norm=False)
    if family == FAMILY_V11:
        raise SamplingError(f"{family} is a text-to-image model: it has no published editing defaults")
    raise SamplingError(f"unknown model family {family!r}; expected {FAMILY_V1} or {FAMILY_V11}")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """shift(t) = t / (s - (s - 1) t); s > 1 spends more steps near the noise end. t: any shape."""
    return t / (shift - (shift - 1.0) * t)


def timesteps(params: SamplingParams) -> torch.Tensor:
    """The t grid, float64: [N] for legacy-sde, [N + 1] ending at 1.0 for the flow samplers."""
    n = params.num_steps
    if params.sampler == "legacy-sde":
        grid = torch.linspace(0.0, 1.0 - LEGACY_LAST_STEP_SIZE, n, dtype=torch.float64)
        return shift_timesteps(grid, params.timesteps_shift)
    grid = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[:-1]
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([shift_timesteps(grid, params.timesteps_shift), one])


def branch_count(params: SamplingParams, has_image: bool) -> int:
    """Guidance branches per image: [cond, uncond_image, uncond_none], [cond, uncond] or [cond].

    Image guidance exists only for edits; the count follows the requested scales, never a
    scheduled scale.
    """
    if has_image and params.image_guidance_scale > 1.0:
        return 3
    if params.guidance_scale > 1.0:
        return 2
    return 1


def guidance_scales_at(params: SamplingParams, k: int, num_tokens: int) -> tuple[float, float]:
    """(cfg_k, cfg_img_k) for token k of num_tokens under the params' schedule.

    "linear" follows the sampler's code base: NextStep-1 (legacy-sde) falls from the scale
    to ~1, NextStep-1.1 (flow samplers) rises from scale / 2 to the scale.
    """
    if not _is_int(num_tokens) or num_tokens < 1:
        raise SamplingError(f"num_tokens must be a positive integer; got {num_tokens!r}")
    if not _is_int(k) or not 0 <= k < num_tokens:
        raise SamplingError(f"token index must be in [0, {num_tokens}); got {k!r}")
    scales = (params.guidance_scale, params.image_guidance_scale)
    if params.guidance_schedule == "constant":
        return scales
    if params.sampler == "legacy-sde":
        cfg_k, cfg_img_k = (1.0 + (s - 1.0) * (num_tokens - k) / num_tokens for s in scales)
    else:
        cfg_k, cfg_img_k = (max(s / 2.0, 1.0 + (s - 1.0) * k / num_tokens) for s in scales)
    return cfg_k, cfg_img_k


def combine_guidance(v: torch.Tensor, cfg: float, cfg_img: float, rescale: bool) -> torch.Tensor:
    """Guided velocity from the branches' velocities.

    v: float32 [branches, B, D], branches in (1, 2, 3) ordered [cond, uncond] or
    [cond, uncond_image, uncond_none]. Returns float32 [B, D]. With rescale (and more than
    one branch), each row is scaled by min(1, |v_cond| / (|v| + 1e-6)), L2 norms over D.
    """
    if v.dim() != 3 or v.shape[0] not in (1, 2, 3):
        raise SamplingError(f"velocities must have shape [1|2|3, B, D]; got {tuple(v.shape)}")
    v = v.to(torch.float32)
    if v.shape[0] == 1:
        return v[0]
    if v.shape[0] == 2:
        cond, uncond = v
        guided = uncond + cfg * (cond - uncond)
    else:
        cond, uncond_image, uncond_none = v
        guided = uncond_none + cfg_img * (uncond_image - uncond_none) + cfg * (cond - uncond_image)
    if rescale:
        ratio = cond.norm(dim=-1, keepdim=True) / (guided.norm(dim=-1, keepdim=True) + RESCALE_EPS)
        guided = guided * torch.clamp(ratio, max=1.0)
    return guided


# Update rules. x, v, z: float32 [B, D]; t, t_next: floats; each returns float32 [B, D].


def legacy_sde_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, z: torch.Tensor) -> torch.Tensor:
    """One NextStep-1 Euler-Maruyama step: drift (1 + t) v - x, diffusion sqrt(2 (1 - t))."""
    dt = t_next - t
    drift = (1.0 + t) * v - x
    return x + drift * dt + math.sqrt(2.0 * (1.0 - t)) * math.sqrt(dt) * z


def legacy_final_step(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """NextStep-1's last, noiseless step of fixed size 0.04 along the velocity."""
    return x + LEGACY_LAST_STEP_SIZE * v


def _flow_endpoints(x: torch.Tensor, v: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight-line estimates of the noise (t = 0) and the data (t = 1) through x."""
    return x - v * t, x + v * (1.0 - t)


def flow_ode_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Deterministic Euler step of the flow ODE, written as a re-interpolation of the endpoints."""
    noise_est, data_est = _flow_endpoints(x, v, t)
    return noise_est * (1.0 - t_next) + data_est * t_next


def flow_sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, z: torch.Tensor, sigma_max: float
) -> torch.Tensor:
    """NextStep-1.1's flow SDE step (noise level 0.8); sigma_max = the grid's t_{N-1}."""
    dt = t_next - t
    sigma = 1.0 - t
    # At t = 0 sigma / (1 - sigma) is infinite; the first step uses sigma_max instead.
    std = FLOW_NOISE_LEVEL * math.sqrt(sigma / (1.0 - (sigma_max if sigma == 1.0 else sigma)))
    noise_est, data_est = _flow_endpoints(x, v, t)
    mean = noise_est * (1.0 - t_next) + data_est * t_next - (std**2 * dt / (2.0 * sigma)) * noise_est
    return mean + std * math.sqrt(dt) * z


def flow_cps_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, z: torch.Tensor) -> torch.Tensor:
    """NextStep-1.1's "cps" step: keeps a fixed share sin(0.8 pi / 2) of fresh noise in the noise part."""
    std = (1.0 - t_next) * math.sin(FLOW_NOISE_LEVEL * math.pi / 2.0)
    noise_est, data_est = _flow_endpoints(x, v, t)
    noise_keep = math.sqrt((1.0 - t_next) ** 2 - std**2)
    return noise_est * noise_keep + data_est * t_next + std * z


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]


def sample_token(
    velocity_fn: VelocityFn,
    params: SamplingParams,
    token_index: int,
    num_tokens: int,
    noise_fn: NoiseFn,
    num_branches: int,
) -> torch.Tensor:
    """Run the full sampler for one image token of B images that share params.

    velocity_fn(x [B, D] float32, t float) -> v [num_branches, B, D]: the head on every
    branch at the same x. noise_fn(step) -> float32 [B, D]: step 0 is the initial x, step
    i + 1 the z of update i (legacy-sde draws steps 0..N-1, sde and cps 0..N, ode only 0).
    Returns the raw sample, float32 [B, D]; apply finalize_token before feeding it back.
    """
    if num_branches not in (1, 2, 3):
        raise SamplingError(f"num_branches must be 1, 2 or 3; got {num_branches!r}")
    cfg, cfg_img = guidance_scales_at(params, token_index, num_tokens)
    grid = timesteps(params).tolist()
    x = _noise(noise_fn, 0)

    def guided_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        v = velocity_fn(x, t)
        expected = (num_branches, *x.shape)
        if tuple(v.shape) != expected:
            raise SamplingError(f"velocity_fn returned shape {tuple(v.shape)}; expected {expected}")
        return combine_guidance(v, cfg, cfg_img, params.rescale_guidance)

    n = params.num_steps
    if params.sampler == "legacy-sde":
        for i in range(n - 1):
            v = guided_velocity(x, grid[i])
            x = legacy_sde_step(x, v, grid[i], grid[i + 1], _noise(noise_fn, i + 1, x))
        return legacy_final_step(x, guided_velocity(x, grid[n - 1]))

    for i in range(n):
        t, t_next = grid[i], grid[i + 1]
        v = guided_velocity(x, t)
        if params.sampler == "ode":
            x = flow_ode_step(x, v, t, t_next)
        elif params.sampler == "sde":
            x = flow_sde_step(x, v, t, t_next, _noise(noise_fn, i + 1, x), sigma_max=grid[n - 1])
        else:
            x = flow_cps_step(x, v, t, t_next, _noise(noise_fn, i + 1, x))
    return x


def _noise(noise_fn: NoiseFn, step: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """noise_fn(step) as float32, checked against the shape of x when there is one."""
    z = noise_fn(step)
    if z.dim() != 2 or (like is not None and z.shape != like.shape):
        expected = "[B, D]" if like is None else str(list(like.shape))
        raise SamplingError(f"noise_fn({step}) returned shape {list(z.shape)}; expected {expected}")
    return z.to(torch.float32)


def finalize_token(x: torch.Tensor, use_norm: bool) -> torch.Tensor:
    """The token fed back and decoded: layer_norm over D (no affine, eps 1e-6) when use_norm.

    x: [B, D]. Returns float32 [B, D].
    """
    x = x.to(torch.float32)
    if not use_norm:
        return x
    return F.layer_norm(x, x.shape[-1:], eps=TOKEN_NORM_EPS)


def update_coefficients(params: SamplingParams, i: int) -> tuple[float, float, float]:
    """Update i of the sampler as x_new = a x + b v + c z (the same algebra as the step functions).

    For legacy-sde, i = N - 1 is the final 0.04 step. Fused kernels use this form.
    """
    grid = timesteps(params).tolist()
    n = params.num_steps
    t = grid[i]
    if params.sampler == "legacy-sde":
        if i == n - 1:
            return 1.0, LEGACY_LAST_STEP_SIZE, 0.0
        dt = grid[i + 1] - t
        return 1.0 - dt, (1.0 + t) * dt, math.sqrt(2.0 * (1.0 - t)) * math.sqrt(dt)
    t_next = grid[i + 1]
    if params.sampler == "ode":
        return 1.0, t_next - t, 0.0
    if params.sampler == "sde":
        dt, sigma, sigma_max = t_next - t, 1.0 - t, grid[n - 1]
        std = FLOW_NOISE_LEVEL * math.sqrt(sigma / (1.0 - (sigma_max if sigma == 1.0 else sigma)))
        k = std**2 * dt / (2.0 * sigma)
        return 1.0 - k, t_next - t + k * t, std * math.sqrt(dt)
    std = (1.0 - t_next) * math.sin(FLOW_NOISE_LEVEL * math.pi / 2.0)
    keep = math.sqrt((1.0 - t_next) ** 2 - std**2)
    return keep + t_next, -t * keep + (1.0 - t) * t_next, std
