"""The image VAE: a FLUX-style AutoencoderKL (NextStep-1-f8ch16-Tokenizer) and its checkpoint I/O.

A VAE directory holds `config.json` + `checkpoint.pt` (a plain torch state dict). Weight names
follow the published checkpoint: `encoder.down.{l}.block.{b}.*`, `encoder.down.{l}.downsample.conv`,
`encoder.mid.{block_1,attn_1,block_2}`, `decoder.up.{l}.block.{b}.*`, `decoder.up.{l}.upsample.conv`,
... where level l counts from the highest resolution (l = 0).

The model here only maps pixels <-> posterior moments / VAE-space latents; the NextStep latent
algebra (encoder_norm, scaling, shift, patchify) lives in `model/latents.py`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import FAMILY_V1, FAMILY_V11, ConfigError

log = logging.getLogger(__name__)

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
# The posterior's log-variance is clamped like the LDM/diffusers DiagonalGaussianDistribution.
LOGVAR_RANGE = (-30.0, 20.0)
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"

# Defaults that differ between the two code bases; values in config.json win.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    FAMILY_V1: dict(scaling_factor=0.3611, shift_factor=0.1159, deterministic=False, encoder_norm=False, psz=None),
    FAMILY_V11: dict(scaling_factor=1.0, shift_factor=0.0, deterministic=True, encoder_norm=True, psz=1),
}

# Fields that decide the weights' names and shapes (the rest only affect the latent algebra).
ARCHITECTURE_FIELDS = ("in_channels", "ch", "out_ch", "ch_mult", "num_res_blocks", "z_channels")


class VAELoadError(ValueError):
    """A VAE directory whose files cannot be loaded into the configured AutoencoderKL."""


@dataclass(frozen=True)
class VAEConfig:
    """The VAE's config.json fields. Dataclass defaults are the published NextStep-1 values."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    deterministic: bool = False
    encoder_norm: bool = False
    # patch size for encoder_norm; None means no patchify (the same as 1)
    psz: int | None = None

    def __post_init__(self) -> None:
        for key in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels"):
            _require_positive_int(key, getattr(self, key))
        if self.ch % GROUP_NORM_GROUPS:
            raise ConfigError(
                f"VAE config field ch must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups), got {self.ch}"
            )
        if not isinstance(self.ch_mult, (list, tuple)) or not self.ch_mult:
            raise ConfigError(
                f"VAE config field ch_mult must be a non-empty list of positive integers, got {self.ch_mult!r}"
            )
        for multiplier in self.ch_mult:
            _require_positive_int("ch_mult entry", multiplier)
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for key in ("scaling_factor", "shift_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"VAE config field {key} must be a finite number, got {value!r}")
            object.__setattr__(self, key, float(value))
        if self.scaling_factor == 0:
            raise ConfigError("VAE config field scaling_factor must not be 0")
        for key in ("deterministic", "encoder_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"VAE config field {key} must be true or false, got {getattr(self, key)!r}")
        if self.psz is not None:
            _require_positive_int("psz", self.psz)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent position along each side (8 for the published VAE)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ch_mult"] = list(self.ch_mult)
        return data

    @classmethod
    def from_dict(cls, raw: dict[str, Any], family: str) -> VAEConfig:
        """Parse a VAE config.json dict; `family` (FAMILY_V1 / FAMILY_V11) picks the defaults."""
        if family not in FAMILY_DEFAULTS:
            raise ConfigError(f"unknown model family {family!r} (expected {FAMILY_V1!r} or {FAMILY_V11!r})")
        if not isinstance(raw, dict):
            raise ConfigError("VAE config.json must contain a JSON object")
        values = dict(FAMILY_DEFAULTS[family])
        values.update({f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path, family: str) -> VAEConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no VAE config.json at {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw, family)


def _require_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"VAE config field {key} must be a positive integer, got {value!r}")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUP_NORM_GROUPS, channels, eps=GROUP_NORM_EPS)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in, H, W] -> [B, out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]; softmax in float32."""
        b, c, h, w = x.shape
        normed = self.norm(x)
        # [B, C, H, W] -> [B, H*W, C]
        q, k, v = (proj(normed).flatten(2).transpose(1, 2).float() for proj in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        attended = (weights @ v).to(x.dtype).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H/2, W/2]; zero-pads right and bottom by 1 first."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, 2H, 2W] (nearest, then a 3x3 conv)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = conv3x3(config.in_channels, config.ch)
        self.down = nn.ModuleList(
            EncoderLevel(config.ch if l == 0 else widths[l - 1], widths[l], config.num_res_blocks, l != levels - 1)
            for l in range(levels)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = conv3x3(widths[-1], 2 * config.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W] -> moments [B, 2*z_channels, H/f, W/f] (mean then logvar)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        levels = len(widths)
        self.conv_in = conv3x3(config.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # up[l] runs at level l (0 = highest resolution); its input comes from level l+1.
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(l + 1, levels - 1)], widths[l], config.num_res_blocks + 1, l != 0)
            for l in range(levels)
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = conv3x3(widths[0], config.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, z_channels, h, w] -> [B, out_ch, h*f, w*f]."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels: [B, in_channels, H, W] in [-1, 1], H and W multiples of f (8)
        -> (mean, logvar), each [B, z_channels, H/f, W/f] in the module dtype; logvar clamped to [-30, 20]."""
        f = self.config.downsample_factor
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(f"pixels must be [B, {self.config.in_channels}, H, W], got {list(pixels.shape)}")
        height, width = pixels.shape[2:]
        if height % f or width % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {height}x{width}")
        moments = self.encoder(pixels.to(self.dtype))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: [B, z_channels, h, w] (VAE space) -> pixels [B, out_ch, h*f, w*f] (not clamped), module dtype."""
        if z.ndim != 4 or z.shape[1] != self.config.z_channels:
            raise ValueError(f"latents must be [B, {self.config.z_channels}, h, w], got {list(z.shape)}")
        return self.decoder(z.to(self.dtype))


def _empty_autoencoder(config: VAEConfig) -> AutoencoderKL:
    """An AutoencoderKL with uninitialised storage: skips (and keeps off the global RNG) torch's default init."""
    with torch.device("meta"):
        return AutoencoderKL(config)


def random_vae(config: VAEConfig, seed: int) -> AutoencoderKL:
    """A VAE with deterministic random weights from a private torch.Generator (for tests).

    Convs get N(0, 1/fan_in) weights so activations stay of order 1 through the residual stack;
    GroupNorm affines are jittered around identity so a swapped norm weight changes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    model = _empty_autoencoder(config).to_empty(device="cpu")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / math.sqrt(fan_in))
                module.bias.copy_(0.02 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    model.requires_grad_(False)
    return model.eval()


TINY_VAE_CONFIG = VAEConfig(resolution=32, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)


def save_vae(directory: str | Path, model: AutoencoderKL, config: VAEConfig) -> None:
    """Write `config.json` + `checkpoint.pt` (a plain float state dict) in the published layout."""
    if any(getattr(model.config, key) != getattr(config, key) for key in ARCHITECTURE_FIELDS):
        raise ValueError("save_vae: the config's architecture fields do not match the model's")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    torch.save(state, directory / CHECKPOINT_FILE)


def load_vae(
    directory: str | Path, family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[AutoencoderKL, VAEConfig]:
    """Load a VAE directory (config.json + checkpoint.pt) strictly: every weight must match by name and shape."""
    directory = Path(directory)
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (directory / name).is_file():
            raise VAELoadError(f"VAE directory {directory} has no {name}")
    config = VAEConfig.from_file(directory / CONFIG_FILE, family)
    state = _read_state_dict(directory / CHECKPOINT_FILE)
    model = _empty_autoencoder(config)
    expected = model.state_dict()
    _check_state_dict(state, expected, directory / CHECKPOINT_FILE)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model, config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: a plain state dict, or one nested under "state_dict" / "model"."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for corrupt or unsafe files
        raise VAELoadError(f"cannot read VAE checkpoint {path}: {err}") from err
    if isinstance(loaded, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded.get(wrapper), dict):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise VAELoadError(f"VAE checkpoint {path} is not a state dict of tensors")
    return loaded


def _check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shapes = [
        f"{key} (checkpoint {list(state[key].shape)}, model {list(tensor.shape)})"
        for key, tensor in expected.items()
        if key in state and state[key].shape != tensor.shape
    ]
    # extra tensors (upstream loads this file non-strictly) are reported, not fatal
    if unexpected:
        log.warning("VAE checkpoint %s: ignored unexpected keys (%d): %s", path, len(unexpected), _first_few(unexpected))
    problems = [
        f"{label} ({len(items)}): {_first_few(items)}"
        for label, items in (("missing keys", missing), ("wrong shapes", wrong_shapes))
        if items
    ]
    if problems:
        raise VAELoadError(f"VAE checkpoint {path} does not match its config.json: " + "; ".join(problems))


def _first_few(items: list[str], shown: int = 5) -> str:
    text = ", ".join(items[:shown])
    return text if len(items) <= shown else f"{text}, ... and {len(items) - shown} more"
