"""Everything one model needs to render: weights, tokenizer and VAE, from a directory or a preset.

A directory is a published checkpoint (see `checkpoint.py`); its VAE comes from `--vae`, else the
config's `vae_name_or_path` relative to the directory, else `DIR/vae`; its default sampling settings
as `sampling_defaults.py` reads them. A preset name builds random weights with the preset's shape,
a tiny tokenizer and a random tiny VAE (benchmarks and tests).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model
from .config import NextStepConfig
from .nextstep import NextStepModel
from .presets import PRESETS, preset_config, random_model
from .reference import ReferenceGenerator
from .sampling_defaults import SamplingDefaults
from .tokenizer import TextTokenizer, write_tiny_tokenizer
from .vae import TINY_VAE_CONFIG, AutoencoderKL, VAEConfig, load_vae, random_vae


@dataclass
class ModelBundle:
    model: NextStepModel
    tokenizer: TextTokenizer
    vae: AutoencoderKL
    vae_config: VAEConfig
    sampling_defaults: SamplingDefaults

    @property
    def config(self) -> NextStepConfig:
        return self.model.config

    def reference_generator(self) -> ReferenceGenerator:
        return ReferenceGenerator(self.model, self.tokenizer, self.vae, self.vae_config)


def resolve_vae_dir(model_dir: Path, config: NextStepConfig, vae_dir: str | Path | None) -> Path:
    if vae_dir is not None:
        return Path(vae_dir)
    if config.vae_name_or_path:
        candidate = model_dir / config.vae_name_or_path
        if candidate.is_dir():
            return candidate
    return model_dir / "vae"


def load_bundle(
    model: str | Path,
    vae: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> ModelBundle:
    """Load a model directory, or build the named preset with random weights (seeded by `seed`)."""
    if str(model) in PRESETS and not Path(model).is_dir():
        return _preset_bundle(str(model), vae, device, dtype, seed)
    model_dir = Path(model)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model} is neither a model directory nor a preset ({', '.join(PRESETS)})")
    net, _ = load_model(model_dir, device=device, dtype=dtype)
    tokenizer = TextTokenizer.from_dir(model_dir)
    tokenizer.check_special_ids(net.config)
    vae_model, vae_config = load_vae(resolve_vae_dir(model_dir, net.config, vae), net.config.family, device, dtype)
    defaults = SamplingDefaults.from_dir(model_dir, net.config.family)
    return ModelBundle(net, tokenizer, vae_model, vae_config, defaults)


def _preset_bundle(name: str, vae: str | Path | None, device, dtype, seed: int) -> ModelBundle:
    config = preset_config(name)
    net = random_model(config, seed=seed, device=device, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="nextstep-tokenizer-") as tmp:
        write_tiny_tokenizer(Path(tmp), config)
        tokenizer = TextTokenizer.from_dir(Path(tmp))
    if vae is not None:
        vae_model, vae_config = load_vae(Path(vae), config.family, device, dtype)
    else:
        vae_config = TINY_VAE_CONFIG
        vae_model = random_vae(vae_config, seed=seed).to(device=device, dtype=dtype).eval()
    return ModelBundle(net, tokenizer, vae_model, vae_config, SamplingDefaults(config.family))
