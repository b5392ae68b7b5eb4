"""Image tokens <-> latents <-> pixels, checked against explicit loops and formulas."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from model.latents import (
    decode_image_tokens,
    encode_image_tokens,
    encoder_layer_norm,
    from_vae_space,
    image_to_pixels,
    patchify,
    pixels_to_uint8,
    to_vae_space,
    uint8_to_pil,
    unpatchify,
)
from model.vae import TINY_VAE_CONFIG, random_vae

# NextStep-1 style: posterior sample, no encoder_norm, non-trivial scale and shift.
SAMPLED_CONFIG = TINY_VAE_CONFIG
# NextStep-1.1 style: normalised posterior mean.
NORMED_CONFIG = dataclasses.replace(
    TINY_VAE_CONFIG, scaling_factor=1.3, shift_factor=-0.2, deterministic=True, encoder_norm=True, psz=1
)


@pytest.fixture(scope="module")
def vae():
    return random_vae(TINY_VAE_CONFIG, seed=7)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_pixels(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=seeded(seed)) * 2 - 1


def patchify_by_loops(latent: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = latent.shape
    out = torch.empty(b, (h // p) * (w // p), c * p * p)
    for n in range(b):
        for row in range(h // p):
            for col in range(w // p):
                for ch in range(c):
                    for pi in range(p):
                        for pj in range(p):
                            token, element = row * (w // p) + col, ch * p * p + pi * p + pj
                            out[n, token, element] = latent[n, ch, row * p + pi, col * p + pj]
    return out


def layer_norm_by_numpy(vectors: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise each row: (x - mean) / sqrt(mean((x - mean)^2) + eps)."""
    centred = vectors - vectors.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=-1, keepdims=True) + eps)


# --- patchify -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3])
def test_patchify_orders_tokens_in_raster_order_and_values_channel_major(p):
    latent = torch.randn(2, 3, 2 * p, 3 * p, generator=seeded(p))
    assert torch.equal(patchify(latent, p), patchify_by_loops(latent, p))


def test_patchify_of_a_non_square_latent_round_trips():
    latent = torch.randn(2, 16, 48, 32, generator=seeded(1))
    tokens = patchify(latent, 2)
    assert tokens.shape == (2, 24 * 16, 64)
    assert torch.equal(unpatchify(tokens, 24, 16, 16, 2), latent)


def test_unpatchify_inverts_patchify_for_random_tokens():
    tokens = torch.randn(3, 4 * 5, 64, generator=seeded(2))
    assert torch.equal(patchify(unpatchify(tokens, 4, 5, 16, 2), 2), tokens)


def test_patchify_rejects_a_latent_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        patchify(torch.zeros(1, 16, 5, 4), 2)


def test_unpatchify_rejects_a_token_count_that_does_not_match_the_grid():
    with pytest.raises(ValueError, match=r"\[B, 12, 64\]"):
        unpatchify(torch.zeros(1, 10, 64), 3, 4, 16, 2)


# --- VAE space ----------------------------------------------------------------------------------


def test_vae_space_conversion_applies_scale_and_shift_and_inverts():
    config = dataclasses.replace(TINY_VAE_CONFIG, scaling_factor=0.25, shift_factor=0.5)
    latent = torch.randn(1, 16, 2, 3, generator=seeded(3), dtype=torch.float64)
    z = to_vae_space(latent, config)
    assert torch.allclose(z, latent * 4 + 0.5)
    assert torch.allclose(from_vae_space(z, config), latent)


# --- pixels -------------------------------------------------------------------------------------


def test_image_to_pixels_maps_0_255_to_minus_one_one_without_resampling_at_the_target_size():
    array = np.random.default_rng(0).integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
    pixels = image_to_pixels(Image.fromarray(array), width=32, height=16)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 16, 32)
    expected = array.transpose(2, 0, 1).astype(np.float64) * (2 / 255) - 1
    np.testing.assert_allclose(pixels.numpy(), expected, atol=1e-6)


def test_image_to_pixels_keeps_the_centre_of_a_wide_image():
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    array = np.zeros((40, 120, 3), dtype=np.uint8)
    array[:, :40], array[:, 40:80], array[:, 80:] = red, green, blue
    pixels = image_to_pixels(Image.fromarray(array), width=16, height=16)
    assert pixels.shape == (3, 16, 16)
    # resized to 48x16, the crop is exactly the green third; only its border columns see bicubic bleed
    assert torch.allclose(pixels[:, :, 2:14], torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)
    column_colour = pixels.mean(dim=1)
    assert (column_colour[1] > column_colour[0]).all() and (column_colour[1] > column_colour[2]).all()


def test_image_to_pixels_keeps_the_centre_of_a_tall_image_at_a_non_square_target():
    array = np.zeros((100, 50, 3), dtype=np.uint8)
    array[:25], array[25:75], array[75:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    pixels = image_to_pixels(Image.fromarray(array), width=32, height=16)
    # resized to 32x64 (covers 32 wide); rows 24..40 of it are original rows 37..63: all green
    assert torch.allclose(pixels, torch.tensor([-1.0, 1.0, -1.0])[:, None, None], atol=0.02)


def test_image_to_pixels_converts_grey_and_rgba_to_rgb():
    for mode in ("L", "RGBA"):
        pixels = image_to_pixels(Image.new(mode, (20, 20)), width=16, height=16)
        assert pixels.shape == (3, 16, 16)


def test_pixels_to_uint8_clamps_and_rounds():
    # (v/2 + 0.5) * 255 for the values below: 0, 255, 127.5, 255 (clamped), 0 (clamped), 10.4, 10.6
    values = torch.tensor([-1.0, 1.0, 0.0, 2.0, -3.0, 10.4 / 127.5 - 1, 10.6 / 127.5 - 1])
    pixels = values.reshape(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = pixels_to_uint8(pixels)
    assert out.dtype == torch.uint8 and out.shape == (1, 1, 7, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 255, 0, 10, 11]


def test_pixels_to_uint8_puts_channels_last():
    pixels = random_pixels(2, 3, 5, seed=4)
    expected = np.rint((np.clip(pixels.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(pixels_to_uint8(pixels).numpy(), expected)


def test_uint8_to_pil_gives_an_rgb_image_with_the_same_pixels():
    array = torch.randint(0, 256, (4, 6, 3), dtype=torch.uint8, generator=seeded(5))
    image = uint8_to_pil(array)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert np.array_equal(np.asarray(image), array.numpy())


# --- encode / decode ----------------------------------------------------------------------------


def test_encoder_norm_normalises_each_position_over_its_channels():
    mean = torch.randn(2, 16, 3, 4, generator=seeded(6)) * 3 + 1
    expected = layer_norm_by_numpy(mean.permute(0, 2, 3, 1).double().numpy()).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(encoder_layer_norm(mean, psz=1).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(encoder_layer_norm(mean, psz=None).numpy(), expected, atol=1e-5)


def test_encoder_norm_with_psz_2_normalises_each_2x2_block_over_all_its_numbers():
    mean = torch.randn(1, 4, 4, 6, generator=seeded(7)) * 2 - 1
    source = mean.double().numpy()
    expected = np.empty_like(source)
    for row in range(0, 4, 2):
        for col in range(0, 6, 2):
            block = source[0, :, row : row + 2, col : col + 2]
            centred = block - block.mean()
            expected[0, :, row : row + 2, col : col + 2] = centred / np.sqrt((centred**2).mean() + 1e-6)
    np.testing.assert_allclose(encoder_layer_norm(mean, psz=2).numpy(), expected, atol=1e-5)


def test_encode_with_encoder_norm_uses_the_normalised_mean_then_scale_and_shift(vae):
    pixels = random_pixels(2, 32, 48)
    tokens = encode_image_tokens(vae, NORMED_CONFIG, pixels, patch_size=2)
    assert tokens.shape == (2, 2 * 3, 64) and tokens.dtype == torch.float32
    mean = vae.encode_moments(pixels)[0].permute(0, 2, 3, 1).double().numpy()
    latent = (layer_norm_by_numpy(mean) - (-0.2)) * 1.3
    expected = patchify_by_loops(torch.from_numpy(latent.transpose(0, 3, 1, 2)).float(), 2)
    assert torch.allclose(tokens, expected, atol=1e-5)


def test_deterministic_encode_ignores_noise(vae):
    pixels = random_pixels(1, 32, 32)
    noise = torch.randn(1, 16, 4, 4, generator=seeded(8))
    assert torch.equal(
        encode_image_tokens(vae, NORMED_CONFIG, pixels, 2), encode_image_tokens(vae, NORMED_CONFIG, pixels, 2, noise)
    )


def test_sampled_encode_is_mean_plus_std_times_the_given_noise(vae):
    pixels = random_pixels(2, 16, 32, seed=1)
    noise = torch.randn(2, 16, 2, 4, generator=seeded(9))
    tokens = encode_image_tokens(vae, SAMPLED_CONFIG, pixels, patch_size=2, noise=noise)
    mean, logvar = vae.encode_moments(pixels)
    sample = mean + torch.sqrt(torch.exp(logvar)) * noise
    expected = patchify_by_loops((sample - 0.1159) * 0.3611, 2)
    assert torch.allclose(tokens, expected, atol=1e-6)
    other = encode_image_tokens(vae, SAMPLED_CONFIG, pixels, patch_size=2, noise=-noise)
    assert not torch.allclose(tokens, other)


def test_sampled_encode_requires_noise_of_the_latent_shape(vae):
    pixels = random_pixels(1, 16, 16)
    with pytest.raises(ValueError, match="noise"):
        encode_image_tokens(vae, SAMPLED_CONFIG, pixels, 2)
    with pytest.raises(ValueError, match=r"noise must be \[1, 16, 2, 2\]"):
        encode_image_tokens(vae, SAMPLED_CONFIG, pixels, 2, noise=torch.zeros(1, 16, 4, 4))


def test_encode_rejects_image_sizes_not_multiple_of_16(vae):
    with pytest.raises(ValueError, match="multiples of 16"):
        encode_image_tokens(vae, NORMED_CONFIG, random_pixels(1, 40, 32), 2)


def test_decode_unpatchifies_rescales_decodes_and_clamps(vae):
    tokens = torch.randn(2, 2 * 3, 64, generator=seeded(10)) * 3
    pixels = decode_image_tokens(vae, SAMPLED_CONFIG, tokens, grid_h=2, grid_w=3, channels=16, patch_size=2)
    assert pixels.shape == (2, 3, 32, 48) and pixels.dtype == torch.float32
    unclamped = vae.decode(unpatchify(tokens, 2, 3, 16, 2) / 0.3611 + 0.1159)
    assert unclamped.abs().max() > 1  # so the clamp is exercised
    assert torch.allclose(pixels, unclamped.clamp(-1, 1), atol=1e-6)


def test_decode_rejects_tokens_that_do_not_fill_the_grid(vae):
    with pytest.raises(ValueError, match="tokens must be"):
        decode_image_tokens(vae, SAMPLED_CONFIG, torch.zeros(1, 5, 64), grid_h=2, grid_w=3, channels=16, patch_size=2)
