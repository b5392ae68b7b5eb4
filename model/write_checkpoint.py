"""Write a random checkpoint in the exact published directory layout.

    python -m model.write_checkpoint --preset tiny --out /tmp/nextstep-tiny

Layout: config.json (NextStep-1 or NextStep-1.1 naming), float32 safetensors shards with
`model.safetensors.index.json` (or one `model.safetensors`), an `lm_head.weight` the loader must
skip, Qwen2-style tokenizer files, and `vae/config.json` + `vae/checkpoint.pt`. Tests load it with
the same code that loads a downloaded checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import FAMILY_V11, RENAMED_FIELDS, NextStepConfig
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .nextstep import NextStepModel
from .presets import PRESETS, preset_config, random_model
from .tokenizer import write_tiny_tokenizer
from .vae import TINY_VAE_CONFIG, random_vae, save_vae


def config_json(config: NextStepConfig, naming: str) -> dict:
    """config.json content in the naming of the given family's code base."""
    data = config.to_dict()
    data.pop("family")
    data.pop("name")
    data["_name_or_path"] = config.name
    if naming == FAMILY_V11:
        for old, new in RENAMED_FIELDS.items():
            data[new] = data.pop(old)
    # published configs point at upstream python; the loader must never follow it
    data["auto_map"] = {"AutoModel": "models.nextstep_model.NextStep"}
    return data


def write_weights(directory: Path, state: dict[str, torch.Tensor], shards: int, prefix: str = "") -> None:
    """Save `state` as float32 safetensors: one file, or `shards` files plus an index."""
    tensors = {prefix + name: t.detach().float().contiguous() for name, t in state.items()}
    if shards <= 1:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * per_shard : (i + 1) * per_shard]}
        save_file(part, str(directory / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")


def write_checkpoint(
    directory: str | Path,
    config: NextStepConfig,
    model: NextStepModel,
    *,
    naming: str | None = None,
    shards: int = 3,
    key_prefix: str = "",
    vae_seed: int = 0,
) -> Path:
    """Write `model` (+ a random tiny VAE and a tiny tokenizer) as a published checkpoint directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    naming = naming or config.family
    (directory / "config.json").write_text(json.dumps(config_json(config, naming), indent=2), encoding="utf-8")
    state = dict(model.state_dict())
    generator = torch.Generator().manual_seed(vae_seed)
    state["lm_head.weight"] = torch.randn(config.vocab_size, config.hidden_size, generator=generator)
    write_weights(directory, state, shards, key_prefix)
    write_tiny_tokenizer(directory, config)
    vae_dir = directory / (config.vae_name_or_path or "vae")
    save_vae(vae_dir, random_vae(TINY_VAE_CONFIG, seed=vae_seed), TINY_VAE_CONFIG)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (default: tiny)")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--naming", choices=["nextstep-1", "nextstep-1.1"], help="config.json naming (default: the preset's family)")
    parser.add_argument("--shards", type=int, default=3, help="number of safetensors shards (1 = model.safetensors)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    config = preset_config(args.preset)
    model = random_model(config, seed=args.seed)
    path = write_checkpoint(args.out, config, model, naming=args.naming, shards=args.shards, vae_seed=args.seed)
    print(f"wrote {args.preset} checkpoint to {path}")


if __name__ == "__main__":
    main()
