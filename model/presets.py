"""Named model shapes: the published ones (random weights, for benchmarks) and `tiny` (for tests)."""

from __future__ import annotations

import math

import torch

from .checkpoint import assign_tensor
from .config import FAMILY_V1, FAMILY_V11, ConfigError, NextStepConfig
from .nextstep import NextStepModel

# Qwen2.5-14B decoder shape shared by every published NextStep checkpoint.
_LARGE_DECODER = dict(
    hidden_size=5120,
    num_hidden_layers=48,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=13824,
    vocab_size=152064,
    rms_norm_eps=1e-5,
    attention_bias=True,
    o_attention_bias=False,
    rope_theta=1_000_000.0,
    max_position_embeddings=131072,
    fm_head_dim=1536,
    fm_head_layers=12,
    vae_name_or_path="vae/",
)

PRESETS: dict[str, dict] = {
    "nextstep-1-large": dict(_LARGE_DECODER, latent_size=32, base_image_grid_size=32, family=FAMILY_V1),
    "nextstep-1.1": dict(_LARGE_DECODER, latent_size=64, base_image_grid_size=64, family=FAMILY_V11),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=352,
        vocab_size=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        fm_head_dim=128,
        fm_head_layers=3,
        latent_size=8,
        base_image_grid_size=32,
        pad_token_id_added=505,
        boi=507,
        eoi=508,
        image_placeholder_id=509,
        vae_name_or_path="vae/",
        family=FAMILY_V1,
    ),
}


def preset_config(name: str) -> NextStepConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return NextStepConfig.from_dict(dict(PRESETS[name], name=name), name=name)


def _init_std(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) for a parameter: variance-preserving linears, near-identity norms, small adaLN."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight") or name.endswith("in_ln.weight"):
        return 1.0, 0.02
    if name.endswith(".bias") or name == "gen_pos_embed":
        return 0.0, 0.02
    if name == "embed_tokens.weight":
        return 0.0, 1.0
    fan_in = shape[-1]
    scale = 0.1 if "adaLN_modulation" in name else 1.0
    return 0.0, scale / math.sqrt(fan_in)


@torch.no_grad()
def random_model(
    config: NextStepConfig, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> NextStepModel:
    """A NextStepModel with deterministic random weights, materialised straight on `device` in `dtype`.

    Built on the meta device first, so a 14B preset never exists twice in memory.
    """
    with torch.device("meta"):
        model = NextStepModel(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        mean, std = _init_std(name, tensor.shape)
        value = torch.empty(tensor.shape, device=device, dtype=dtype).normal_(mean, std, generator=generator)
        assign_tensor(model, name, value)
    return model.eval()

