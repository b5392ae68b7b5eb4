"""Image tokens <-> VAE latents <-> pixels: patchify, latent scaling, encoder_norm, pixel conversion.

One image token is a p x p patch of the latent (p = 2 for the published models: 16 channels x 2 x 2
= 64 numbers), tokens in raster order, the token vector ordered channel-major, then patch row, then
patch column. NextStep latent = (vae_sample - shift_factor) * scaling_factor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .vae import AutoencoderKL, VAEConfig

ENCODER_NORM_EPS = 1e-6


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """latent: [B, C, H, W] -> tokens [B, (H/p)*(W/p), C*p*p] in raster order;
    token vector index = c*p*p + pi*p + pj."""
    if latent.ndim != 4:
        raise ValueError(f"latent must be [B, C, H, W], got {list(latent.shape)}")
    b, c, h, w = latent.shape
    if h % p or w % p:
        raise ValueError(f"latent height and width must be multiples of the patch size {p}, got {h}x{w}")
    patches = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, grid_h: int, grid_w: int, channels: int, p: int) -> torch.Tensor:
    """tokens: [B, grid_h*grid_w, channels*p*p] -> latent [B, channels, grid_h*p, grid_w*p] (inverse of patchify)."""
    expected = [grid_h * grid_w, channels * p * p]
    if tokens.ndim != 3 or list(tokens.shape[1:]) != expected:
        raise ValueError(f"tokens must be [B, {expected[0]}, {expected[1]}], got {list(tokens.shape)}")
    b = tokens.shape[0]
    patches = tokens.reshape(b, grid_h, grid_w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, grid_h * p, grid_w * p)


def to_vae_space(latent: torch.Tensor, vae_config: VAEConfig) -> torch.Tensor:
    """NextStep latent [B, C, h, w] -> VAE latent z = latent / scaling_factor + shift_factor (same shape)."""
    return latent / vae_config.scaling_factor + vae_config.shift_factor


def from_vae_space(z: torch.Tensor, vae_config: VAEConfig) -> torch.Tensor:
    """VAE latent [B, C, h, w] -> NextStep latent (z - shift_factor) * scaling_factor (same shape)."""
    return (z - vae_config.shift_factor) * vae_config.scaling_factor


def image_to_pixels(pil_image: Image.Image, width: int, height: int) -> torch.Tensor:
    """A PIL image -> [3, height, width] float32 in [-1, 1].

    Resized (bicubic, aspect ratio kept) to the smallest size that covers width x height,
    then center-cropped to exactly width x height.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    image = pil_image.convert("RGB")
    source_w, source_h = image.size
    scale = max(width / source_w, height / source_h)
    resized_w = max(width, round(source_w * scale))
    resized_h = max(height, round(source_h * scale))
    if (resized_w, resized_h) != (source_w, source_h):
        image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC)
    left = (resized_w - width) // 2
    top = (resized_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """pixels: [B, 3, H, W] in [-1, 1] (clamped) -> uint8 [B, H, W, 3] = round((v/2 + 0.5) * 255)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {list(pixels.shape)}")
    values = (pixels.float().clamp(-1.0, 1.0) / 2 + 0.5) * 255
    return values.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def uint8_to_pil(image: torch.Tensor) -> Image.Image:
    """image: uint8 [H, W, 3] -> an RGB PIL image."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be a uint8 [H, W, 3] tensor, got {image.dtype} {list(image.shape)}")
    return Image.fromarray(image.cpu().numpy())


def encoder_layer_norm(mean: torch.Tensor, psz: int | None) -> torch.Tensor:
    """mean: [B, C, h, w] -> same shape: each psz x psz patch's C*psz*psz numbers layer-normalised (no affine)."""
    p = psz or 1
    _, c, h, w = mean.shape
    tokens = patchify(mean, p)
    normed = F.layer_norm(tokens, tokens.shape[-1:], eps=ENCODER_NORM_EPS)
    return unpatchify(normed, h // p, w // p, c, p)


def encode_image_tokens(
    vae: AutoencoderKL,
    vae_config: VAEConfig,
    pixels: torch.Tensor,
    patch_size: int,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """pixels: [B, 3, H, W] in [-1, 1], H and W multiples of f*patch_size (16)
    -> image tokens [B, (H/16)*(W/16), z_channels*patch_size^2] float32 (the NextStep latent).

    The VAE sample is the posterior mean when vae_config.deterministic (noise is then unused), else
    mean + exp(logvar/2) * noise with noise [B, z_channels, H/f, W/f] given by the caller.
    """
    step = vae_config.downsample_factor * patch_size
    if pixels.ndim != 4:
        raise ValueError(f"pixels must be [B, 3, H, W], got {list(pixels.shape)}")
    if pixels.shape[2] % step or pixels.shape[3] % step:
        raise ValueError(f"image height and width must be multiples of {step}, got {pixels.shape[2]}x{pixels.shape[3]}")
    mean, logvar = (moment.float() for moment in vae.encode_moments(pixels))
    if vae_config.encoder_norm:
        mean = encoder_layer_norm(mean, vae_config.psz)
    if vae_config.deterministic:
        z = mean
    else:
        if noise is None:
            raise ValueError("this VAE samples its posterior (deterministic is false): pass the noise")
        if noise.shape != mean.shape:
            raise ValueError(f"noise must be {list(mean.shape)}, got {list(noise.shape)}")
        z = mean + torch.exp(logvar / 2) * noise.to(mean.device, torch.float32)
    return patchify(from_vae_space(z, vae_config), patch_size)


def decode_image_tokens(
    vae: AutoencoderKL,
    vae_config: VAEConfig,
    tokens: torch.Tensor,
    grid_h: int,
    grid_w: int,
    channels: int,
    patch_size: int,
) -> torch.Tensor:
    """tokens: [B, grid_h*grid_w, channels*patch_size^2] (NextStep latent, raster order)
    -> pixels [B, 3, grid_h*16, grid_w*16] float32 clamped to [-1, 1]."""
    latent = unpatchify(tokens.float(), grid_h, grid_w, channels, patch_size)
    pixels = vae.decode(to_vae_space(latent, vae_config))
    return pixels.float().clamp(-1.0, 1.0)
