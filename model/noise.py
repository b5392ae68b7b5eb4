"""Counter-based Gaussian noise: a pure function of (seed, image, token, step).

Every random number the samplers use is Philox4x32-10 of a counter that names it, so a
batched engine reproduces one image's noise exactly whatever else shares the batch, and
a Triton kernel can make the same numbers in-kernel with `tl.philox`,
`tl.random.uint_to_uniform_float` and `tl.random.pair_uniform_to_normal`. The functions
below mirror those three (triton/language/random.py) operation for operation.

Counters, key = the request seed (k0 = low 32 bits, k1 = high 32 bits):
- token noise: (c0 = j, c1 = token index, c2 = step, c3 = image index) gives the four
  numbers 4j .. 4j+3 of the token's noise row.
- posterior noise (VAE sample of an edit's input image): (c0, c1 = block index low/high,
  c2 = 0, c3 = POSTERIOR_IMAGE_INDEX), so every image of a request shares it.
Step convention: step 0 is the token's initial x ~ N(0, I); step i+1 is the z used by
sampler update i.
"""

from __future__ import annotations

import torch

UINT32_MASK = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10

# Largest int32 times this stays below 1.0 in float32 (Triton's uint_to_uniform_float).
UINT32_TO_UNIFORM_SCALE = 4.6566127342e-10
BOX_MULLER_MIN_UNIFORM = 1.0e-7
TWO_PI = 6.283185307179586

# c3 value reserved for the posterior noise; token noise image indices stay below it.
POSTERIOR_IMAGE_INDEX = 0xFFFFFFFF


class NoiseError(ValueError):
    """A seed or counter outside the range the noise generator accepts."""


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for uint32 values, without overflowing int64.

    a: int64 tensor of uint32 values (any shape); b: a uint32 constant.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    part_lo = a * b_lo  # < 2**48
    part_hi = a * b_hi  # < 2**48; the full product is part_hi * 2**16 + part_lo
    hi = (part_hi + (part_lo >> 16)) >> 16
    lo = (((part_hi & 0xFFFF) << 16) + part_lo) & UINT32_MASK
    return hi, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 with `rounds` rounds, bit-identical to triton.language.random.philox_impl.

    All arguments: int64 tensors holding uint32 values (broadcastable to one shape).
    Returns the four output words as int64 tensors of uint32 values, broadcast shape.
    """
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & UINT32_MASK
        k1 = (k1 + PHILOX_KEY_B) & UINT32_MASK
    return c0, c1, c2, c3


def uint32_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1), as triton.language.random.uint_to_uniform_float.

    x: int64 tensor of uint32 values, any shape. Returns float32, same shape.
    """
    as_int32 = torch.where(x >= 2**31, x - 2**32, x)  # bitcast to int32
    folded = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)
    scale = torch.tensor(UINT32_TO_UNIFORM_SCALE, dtype=torch.float32)
    return folded.to(torch.float32) * scale


def pair_uniform_to_normal(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-Muller, as triton.language.random.pair_uniform_to_normal, all in float32.

    u1, u2: float32 tensors of one shape. Returns two float32 normals of that shape.
    """
    u1 = torch.clamp(u1, min=BOX_MULLER_MIN_UNIFORM)
    theta = torch.tensor(TWO_PI, dtype=torch.float32) * u2
    radius = torch.sqrt(torch.tensor(-2.0, dtype=torch.float32) * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def philox_normal4(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    seed: torch.Tensor,
) -> torch.Tensor:
    """Four standard normals per counter, as tl.randn4x does from philox's four words.

    c0..c3, seed: int64 tensors (broadcastable); counters hold uint32 values, the seed
    holds the 64 seed bits (two's complement). Returns float32 [*broadcast shape, 4].
    """
    k0 = seed & UINT32_MASK
    k1 = (seed >> 32) & UINT32_MASK
    words = philox4x32(c0, c1, c2, c3, k0, k1)
    u0, u1, u2, u3 = (uint32_to_uniform(w) for w in words)
    n0, n1 = pair_uniform_to_normal(u0, u1)
    n2, n3 = pair_uniform_to_normal(u2, u3)
    return torch.stack([n0, n1, n2, n3], dim=-1)


def _seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """A seed as an int64 tensor (0-d or [B]) carrying its 64 bits.

    Python ints must lie in [0, 2**64); int64 tensors already carry the bits (a seed
    >= 2**63 is stored negative), exactly as a Triton kernel reads an int64 seed.
    """
    if isinstance(seed, torch.Tensor):
        return _integer_tensor(seed, "seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NoiseError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise NoiseError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def _index_tensor(value: int | torch.Tensor, name: str, limit: int = 2**32) -> torch.Tensor:
    """A counter word as an int64 tensor (0-d or [B]), checked to lie in [0, limit)."""
    if isinstance(value, torch.Tensor):
        value = _integer_tensor(value, name)
        low, high = (int(value.min()), int(value.max())) if value.numel() else (0, 0)
        if low < 0 or high >= limit:
            raise NoiseError(f"{name} values must be in [0, {limit}), got values from {low} to {high}")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise NoiseError(f"{name} must be an int or an int64 tensor, got {type(value).__name__}")
    if not 0 <= value < limit:
        raise NoiseError(f"{name} must be in [0, {limit}), got {value}")
    return torch.tensor(value, dtype=torch.int64)


def _integer_tensor(value: torch.Tensor, name: str) -> torch.Tensor:
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise NoiseError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if value.dim() > 1:
        raise NoiseError(f"{name} must be a scalar or a 1-D tensor, got shape {tuple(value.shape)}")
    return value.to(device="cpu", dtype=torch.int64)


def token_noise(
    seed: int | torch.Tensor,
    image_index: int | torch.Tensor,
    token_index: int | torch.Tensor,
    step: int | torch.Tensor,
    dim: int = 64,
) -> torch.Tensor:
    """The noise row for one (seed, image, token, step) per batch row.

    seed, image_index, token_index, step: ints or int64 tensors [B], broadcast together
    (B = 1 when all are ints). 0 <= seed < 2**64, 0 <= image_index < 2**32 - 1 (the top
    value is reserved for the posterior noise), 0 <= token_index, step < 2**32.
    dim: numbers per token, a positive multiple of 4.
    Returns float32 [B, dim]; element 4j+m is normal m of philox counter
    (j, token_index, step, image_index) under key seed.
    """
    if not isinstance(dim, int) or dim <= 0 or dim % 4:
        raise NoiseError(f"dim must be a positive multiple of 4, got {dim!r}")
    seed_t = _seed_tensor(seed)
    image_t = _index_tensor(image_index, "image_index", limit=POSTERIOR_IMAGE_INDEX)
    token_t = _index_tensor(token_index, "token_index")
    step_t = _index_tensor(step, "step")
    try:
        seed_t, image_t, token_t, step_t = torch.broadcast_tensors(seed_t, image_t, token_t, step_t)
    except RuntimeError as err:
        raise NoiseError(f"seed, image_index, token_index and step do not broadcast: {err}") from err
    # rows [B, 1] against the counter blocks [1, dim / 4]
    seed_c, image_c, token_c, step_c = (t.reshape(-1, 1) for t in (seed_t, image_t, token_t, step_t))
    blocks = torch.arange(dim // 4, dtype=torch.int64).reshape(1, -1)
    normals = philox_normal4(blocks, token_c, step_c, image_c, seed_c)
    return normals.reshape(-1, dim)


def posterior_noise(seed: int | torch.Tensor, numel: int) -> torch.Tensor:
    """Noise for sampling the VAE posterior of an edit's input image; depends on the seed only.

    seed: int in [0, 2**64) or a 0-d int64 tensor. numel: how many numbers (>= 0).
    Returns float32 [numel]; element 4b+m is normal m of counter
    (b low 32 bits, b high 32 bits, 0, POSTERIOR_IMAGE_INDEX).
    """
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise NoiseError(f"numel must be a non-negative int, got {numel!r}")
    seed_t = _seed_tensor(seed)
    if seed_t.dim() != 0:
        raise NoiseError(f"posterior_noise takes one seed, got shape {tuple(seed_t.shape)}")
    blocks = torch.arange((numel + 3) // 4, dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    reserved = torch.tensor(POSTERIOR_IMAGE_INDEX, dtype=torch.int64)
    normals = philox_normal4(blocks & UINT32_MASK, blocks >> 32, zero, reserved, seed_t)
    return normals.reshape(-1)[:numel]
