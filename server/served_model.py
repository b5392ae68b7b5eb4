"""What the API needs to know about the served model without loading its weights.

An API-only replica validates sizes and counts prompt tokens with the config and tokenizer alone;
the weights live in the workers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from model.bundle import ModelBundle, load_bundle
from model.config import NextStepConfig
from model.presets import PRESETS, preset_config
from model.sampling_defaults import SamplingDefaults
from model.tokenizer import TextTokenizer, write_tiny_tokenizer

from .config import Settings

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServedModel:
    model_id: str
    config: NextStepConfig
    tokenizer: TextTokenizer
    sampling_defaults: SamplingDefaults


def is_preset(model: str) -> bool:
    return model in PRESETS and not Path(model).is_dir()


def model_id(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    name = settings.model if is_preset(settings.model) else Path(settings.model).resolve().name
    return name if name.startswith("nextstep") else f"nextstep-{name}"


def load_served_model(settings: Settings) -> ServedModel:
    """Config and tokenizer of the model in `settings` (a preset's tokenizer is the tiny one load_bundle builds)."""
    if is_preset(settings.model):
        config = preset_config(settings.model)
        with tempfile.TemporaryDirectory(prefix="nextstep-tokenizer-") as tmp:
            write_tiny_tokenizer(Path(tmp), config)
            tokenizer = TextTokenizer.from_dir(Path(tmp))
        defaults = SamplingDefaults(config.family)
    else:
        directory = Path(settings.model)
        config = NextStepConfig.from_file(directory / "config.json")
        tokenizer = TextTokenizer.from_dir(directory)
        defaults = SamplingDefaults.from_dir(directory, config.family)
    return ServedModel(model_id(settings), config, tokenizer, defaults)


def load_model_bundle(settings: Settings) -> ModelBundle:
    """The full model (weights, tokenizer, VAE) a worker renders with."""
    return load_bundle(
        settings.model, settings.vae, device=settings.device, dtype=TORCH_DTYPES[settings.dtype], seed=settings.seed
    )
