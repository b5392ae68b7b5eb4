"""NextStep model configuration: parsed from a published config.json in either naming.

NextStep-1 checkpoints name the image fields `latent_patch_size`, `latent_channels`,
`fm_head_dim`, ...; NextStep-1.1 renamed them (`patch_size`, `num_channels`,
`genloss_width`, ...). Both parse into one `NextStepConfig`; unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAMILY_V1 = "nextstep-1"
FAMILY_V11 = "nextstep-1.1"


class ConfigError(ValueError):
    """A config.json that cannot describe a NextStep model."""


# NextStep-1 name -> NextStep-1.1 name, for the fields that were renamed.
RENAMED_FIELDS = {
    "latent_patch_size": "patch_size",
    "latent_channels": "num_channels",
    "latent_size": "image_size",
    "fm_head_dim": "genloss_width",
    "fm_head_layers": "genloss_depth",
}

REQUIRED_DECODER_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


@dataclass(frozen=True)
class NextStepConfig:
    # decoder
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = True
    o_attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # image tokens
    latent_patch_size: int = 2
    latent_channels: int = 16
    latent_size: int = 32
    base_image_grid_size: int = 32
    # flow-matching head
    fm_head_dim: int = 1536
    fm_head_layers: int = 12
    # special token ids
    boi: int = 151667
    eoi: int = 151668
    image_placeholder_id: int = 151669
    pad_token_id_added: int = 151665
    use_gen_pos_embed: bool = False
    vae_name_or_path: str | None = None
    # which code base the checkpoint came from (decides published sampler defaults)
    family: str = FAMILY_V1
    # free-form name used in logs and model ids
    name: str = "nextstep"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def token_dim(self) -> int:
        """Numbers in one image token: channels x patch x patch (64 for the published models)."""
        return self.latent_channels * self.latent_patch_size**2

    @property
    def downsample(self) -> int:
        """Pixels per image token side: VAE factor 8 times the latent patch size."""
        return 8 * self.latent_patch_size

    @property
    def native_image_size(self) -> int:
        """The side in pixels the model was trained at: base_image_grid_size tokens (512 for NextStep-1-Large)."""
        return self.base_image_grid_size * self.downsample

    def to_dict(self) -> dict[str, Any]:
        """The config in NextStep-1 naming, as written to config.json by our tools."""
        data = asdict(self)
        data.pop("extra")
        data["architectures"] = ["NextStep"]
        data["model_type"] = "nextstep"
        return data

    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "nextstep") -> NextStepConfig:
        """Parse a config.json dict in NextStep-1 or NextStep-1.1 naming."""
        if not isinstance(raw, dict):
            raise ConfigError("config.json must contain a JSON object")
        missing = [k for k in REQUIRED_DECODER_FIELDS if k not in raw]
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")

        uses_v11_names = any(new in raw for old, new in RENAMED_FIELDS.items() if old not in raw)
        family = raw.get("family") or (FAMILY_V11 if uses_v11_names else FAMILY_V1)
        values: dict[str, Any] = {"family": family, "name": raw.get("name", name)}
        for old, new in RENAMED_FIELDS.items():
            if old in raw:
                values[old] = raw[old]
            elif new in raw:
                values[old] = raw[new]

        known = {f for f in cls.__dataclass_fields__} - {"extra", "family", "name"}
        for key in known:
            if key in raw and key not in values:
                values[key] = raw[key]

        heads = int(raw["num_attention_heads"])
        values.setdefault("num_key_value_heads", raw.get("num_key_value_heads", heads))
        if raw.get("head_dim") is None:
            values["head_dim"] = int(raw["hidden_size"]) // heads
        if "o_attention_bias" not in raw:
            values["o_attention_bias"] = bool(raw.get("attention_bias", True))
        if "base_image_grid_size" not in raw and "latent_size" in values:
            values["base_image_grid_size"] = int(values["latent_size"])
        values["extra"] = {k: v for k, v in raw.items() if k not in known}
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> NextStepConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw, name=path.parent.name or "nextstep")

    def validate(self) -> None:
        positive = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
            "latent_patch_size",
            "latent_channels",
            "fm_head_dim",
            "fm_head_layers",
        )
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (NextStep uses silu)")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        for key in ("boi", "eoi", "image_placeholder_id"):
            token = getattr(self, key)
            if not 0 <= token < self.vocab_size:
                raise ConfigError(f"{key} id {token} is outside the vocabulary (size {self.vocab_size})")
        if self.family not in (FAMILY_V1, FAMILY_V11):
            raise ConfigError(f"unknown model family {self.family!r}")
