"""Load a NextStep model directory exactly as published.

config.json (either naming) + `model.safetensors` or shards listed in `model.safetensors.index.json`.
The model is built on the meta device and every tensor is streamed from its shard straight into
the target dtype and device, so a 59 GB float32 checkpoint never exists twice in memory.
Python files shipped in the directory (`models/`, `utils/`) are never imported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .config import NextStepConfig
from .nextstep import NextStepModel

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SKIPPED_PREFIXES = ("lm_head.",)


class CheckpointError(ValueError):
    """A model directory whose weights do not match the config."""


@dataclass
class LoadReport:
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory, in load order."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index.name} lists shard(s) missing from {directory}: {_preview(absent)}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def assign_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` (dotted) of `model` by `value`, without copying."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _checked_shape(name: str, value: torch.Tensor, expected: torch.Size) -> torch.Tensor:
    if name == "gen_pos_embed":
        # published as [1, L, hidden] or [L, hidden]; L may differ from the base grid
        value = value.reshape(1, -1, value.shape[-1]) if value.dim() in (2, 3) else value
        if value.dim() == 3 and value.shape[-1] == expected[-1]:
            return value
    elif value.shape == expected:
        return value
    raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)}, the config expects {tuple(expected)}")


@torch.no_grad()
def load_weights(
    model: NextStepModel, files: list[Path], device: torch.device | str, dtype: torch.dtype
) -> LoadReport:
    """Stream tensors from `files` into a meta-device `model`; raise if any weight is missing."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    report = LoadReport()
    loaded: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as shard:
            for key in shard.keys():
                name = key[len("model.") :] if key.startswith("model.") else key
                if name.startswith(SKIPPED_PREFIXES):
                    report.skipped.append(key)
                    continue
                if name not in expected:
                    report.unexpected.append(key)
                    continue
                value = _checked_shape(name, shard.get_tensor(key), expected[name])
                value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
                assign_tensor(model, name, value)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} weight(s): {_preview(missing)}")
    if report.unexpected:
        log.warning("ignored %d unexpected weight(s): %s", len(report.unexpected), _preview(report.unexpected))
    report.loaded = len(loaded)
    return report


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[NextStepModel, LoadReport]:
    """Load a published NextStep model directory -> (model in eval mode, report of skipped/unexpected keys)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    config = NextStepConfig.from_file(directory / "config.json")
    files = weight_files(directory)
    with torch.device("meta"):
        model = NextStepModel(config)
    report = load_weights(model, files, device, dtype)
    return model.eval(), report
