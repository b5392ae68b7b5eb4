"""A model directory's default sampling settings: the published ones, adjusted by sampling_defaults.json.

Published NextStep checkpoints carry no such file and get the settings they shipped with
(sampling.published_defaults). A model trained here may name better ones for itself; the demo
model does, because guidance 7.5 over-saturates so small a model:

    {"text_to_image": {"guidance_scale": 2.0}, "edit": {"guidance_scale": 2.0}}

Keys are SamplingParams fields, checked as a request's settings are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .checkpoint import CheckpointError
from .sampling import SamplingError, SamplingParams, published_defaults

SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
MODES = ("text_to_image", "edit")


@dataclass(frozen=True)
class SamplingDefaults:
    family: str
    overrides: Mapping[str, Mapping[str, object]] = field(default_factory=dict)  # mode -> field -> value

    def params(self, edit: bool) -> SamplingParams:
        """The defaults of a text-to-image request (edit False) or an edit; SamplingError if the model has none."""
        return replace(published_defaults(self.family, edit), **self.overrides.get("edit" if edit else "text_to_image", {}))

    @classmethod
    def from_dir(cls, directory: str | Path, family: str) -> SamplingDefaults:
        """The defaults of a model directory; CheckpointError if its sampling_defaults.json is malformed."""
        path = Path(directory) / SAMPLING_DEFAULTS_FILE
        if not path.is_file():
            return cls(family)
        try:
            overrides = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: cannot read sampling defaults: {err}") from err
        if not isinstance(overrides, dict) or not set(overrides) <= set(MODES):
            raise CheckpointError(f"{path}: expected an object with keys among {', '.join(MODES)}")
        defaults = cls(family, overrides)
        for mode, values in overrides.items():
            if not isinstance(values, dict):
                raise CheckpointError(f"{path}: {mode} must be an object of sampling settings")
            try:
                defaults.params(edit=mode == "edit")
            except (TypeError, SamplingError) as err:
                raise CheckpointError(f"{path}: invalid {mode} defaults: {err}") from err
        return defaults
