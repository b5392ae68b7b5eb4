"""Train the demo model from scratch on CPU and write it in the published checkpoint layout.

    python -m model.demo.train                       # about 50 minutes on one CPU thread
    python -m model.demo.train --out /tmp/demo --vae-steps 50 --steps 50   # a quick smoke run

1. VAE: a small FLUX-style AutoencoderKL (f8, 16 latent channels) learns to reconstruct freshly
   drawn scenes: MSE + a small KL, decoding layer-normalised 2x2 latent patches (encoder_norm,
   psz 2) plus posterior noise, so it decodes exactly what the model's use_norm tokens look like.
2. The training pictures (text-to-image scenes and edit pairs) are drawn once and encoded.
3. NextStep: the decoder, projectors and flow-matching head train together, teacher forced over
   prompt + image tokens in the inference prompt layout, with the flow-matching loss on the head.
   Caption dropout (10%) trains the unconditional branch for text guidance; edits also drop their
   instruction (10%, keeping the image) for image guidance.
Everything is seeded: the same seed and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model.config import FAMILY_V1, NextStepConfig
from model.latents import encode_image_tokens, encoder_layer_norm, image_to_pixels
from model.nextstep import NextStepModel
from model.prompts import IMAGE_MARKER, PromptSequence, build_prompt_branches
from model.tokenizer import TextTokenizer, write_tiny_tokenizer
from model.vae import AutoencoderKL, VAEConfig, save_vae
from model.write_checkpoint import config_json, write_weights

from . import WEIGHTS_DIR
from .batches import collate
from .dataset import edit_examples, text_to_image_examples
from .scenes import IMAGE_SIZE, random_scene, render
from .teacher_forcing import flow_matching_loss, plain_linears, teacher_forced_embeds, teacher_forced_hidden

# The demo model: a Qwen2-shaped decoder of 4 layers, a 3-block head, NextStep-1 family (legacy SDE,
# use_norm, editing defaults); special ids at the top of a 512-token vocabulary, as in the tiny preset.
DEMO_MODEL = dict(
    name="nextstep-demo",
    family=FAMILY_V1,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=352,
    vocab_size=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=1024,
    fm_head_dim=256,
    fm_head_layers=3,
    latent_patch_size=2,
    latent_channels=16,
    latent_size=IMAGE_SIZE // 8,
    base_image_grid_size=IMAGE_SIZE // 16,
    pad_token_id_added=505,
    boi=507,
    eoi=508,
    image_placeholder_id=509,
    vae_name_or_path="vae/",
)
# Deterministic layer-normalised latents: the encoder's output is what use_norm sampling produces.
DEMO_VAE = VAEConfig(
    resolution=IMAGE_SIZE,
    ch=32,
    ch_mult=(1, 1, 2, 2),
    num_res_blocks=1,
    z_channels=16,
    scaling_factor=1.0,
    shift_factor=0.0,
    deterministic=True,
    encoder_norm=True,
    psz=2,
)
GRID = IMAGE_SIZE // 16
KL_WEIGHT = 1e-3
TEXT_DROPOUT = 0.1  # text-to-image: train the "" (negative prompt) branch
EDIT_INSTRUCTION_DROPOUT = 0.1  # edit: image without instruction (image guidance's uncond_image)
EDIT_ALL_DROPOUT = 0.05  # edit: neither image nor instruction
EDIT_SHARE = 0.35
FLOW_REPEATS = 4


def demo_config() -> NextStepConfig:
    return NextStepConfig.from_dict(dict(DEMO_MODEL), name=DEMO_MODEL["name"])


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def pixels_of(images: list) -> torch.Tensor:
    """PIL images -> [B, 3, 64, 64] in [-1, 1]."""
    return torch.stack([image_to_pixels(image, IMAGE_SIZE, IMAGE_SIZE) for image in images])


def train_vae(seed: int, steps: int, batch_size: int, started: float) -> AutoencoderKL:
    """Fit DEMO_VAE on freshly drawn training scenes."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(DEMO_VAE)
    rng = np.random.default_rng([seed, 10])
    generator = torch.Generator().manual_seed(seed + 10)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3, warmup=20)
        pixels = pixels_of([render(random_scene(rng, 1 + int(rng.integers(2)))) for _ in range(batch_size)])
        mean, logvar = vae.encode_moments(pixels)
        mean = encoder_layer_norm(mean, DEMO_VAE.psz)
        z = mean + torch.exp(logvar / 2) * torch.randn(mean.shape, generator=generator)
        reconstruction = vae.decode(z)
        mse = torch.nn.functional.mse_loss(reconstruction, pixels)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = mse + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            std = torch.exp(logvar / 2).mean().item()
            log(f"vae step {step}/{steps} mse {mse.item():.4f} kl {kl.item():.3f} posterior std {std:.3f}", started)
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, images: list, chunk: int = 64) -> torch.Tensor:
    """PIL images -> image tokens [B, GRID*GRID, 64] exactly as the reference encodes an edit input."""
    parts = [
        encode_image_tokens(vae, DEMO_VAE, pixels_of(images[i : i + chunk]), DEMO_MODEL["latent_patch_size"])
        for i in range(0, len(images), chunk)
    ]
    return torch.cat(parts)


def init_model(config: NextStepConfig, seed: int) -> NextStepModel:
    """torch's default init, small embeddings, and zeroed adaLN modulations and head output (as in DiT)."""
    torch.manual_seed(seed)
    model = NextStepModel(config)
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0.0, 0.02)
        net = model.image_head.net
        for block in [*net.res_blocks, net.final_layer]:
            block.adaLN_modulation[1].weight.zero_()
            block.adaLN_modulation[1].bias.zero_()
        net.final_layer.linear.weight.zero_()
        net.final_layer.linear.bias.zero_()
    return model.train()


class PromptBook:
    """Each caption's guidance-branch prompts, tokenized once."""

    def __init__(self, tokenizer: TextTokenizer, config: NextStepConfig):
        self.tokenizer = tokenizer
        self.config = config
        self._cache: dict[tuple[str, bool], tuple[PromptSequence, ...]] = {}

    def branches(self, caption: str, edit: bool) -> tuple[PromptSequence, ...]:
        key = (caption, edit)
        if key not in self._cache:
            self._cache[key] = build_prompt_branches(
                self.tokenizer, self.config, caption, GRID, GRID,
                num_branches=3 if edit else 2, input_grid=(GRID, GRID) if edit else None,
            )  # fmt: skip
        return self._cache[key]


def train_model(
    config: NextStepConfig,
    tokenizer: TextTokenizer,
    vae: AutoencoderKL,
    seed: int,
    steps: int,
    batch_size: int,
    num_t2i: int,
    num_edits: int,
    started: float,
) -> tuple[NextStepModel, list[float]]:
    t2i = text_to_image_examples(seed, num_t2i)
    edits = edit_examples(seed, num_edits)
    t2i_tokens = encode(vae, [render(example.scene) for example in t2i])
    source_tokens = encode(vae, [render(edit.source) for edit in edits])
    target_tokens = encode(vae, [render(edit.target) for edit in edits])
    log(f"encoded {len(t2i)} text-to-image pictures and {len(edits)} edit pairs", started)

    model = init_model(config, seed)
    book = PromptBook(tokenizer, config)
    rng = np.random.default_rng([seed, 20])
    generator = torch.Generator().manual_seed(seed + 20)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.98)
    )
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, warmup=100)
        prompts, outputs, inputs = [], [], []
        for _ in range(batch_size):
            if rng.random() < EDIT_SHARE:
                i = int(rng.integers(len(edits)))
                branches = book.branches(IMAGE_MARKER + edits[i].instruction, edit=True)
                u = rng.random()
                branch = 1 if u < EDIT_INSTRUCTION_DROPOUT else 2 if u < EDIT_INSTRUCTION_DROPOUT + EDIT_ALL_DROPOUT else 0
                prompts.append(branches[branch])
                outputs.append(target_tokens[i])
                inputs.append(source_tokens[i] if branches[branch].image_positions else None)
            else:
                i = int(rng.integers(len(t2i)))
                branches = book.branches(t2i[i].caption, edit=False)
                prompts.append(branches[1] if rng.random() < TEXT_DROPOUT else branches[0])
                outputs.append(t2i_tokens[i])
                inputs.append(None)
        batch = collate(prompts, torch.stack(outputs), inputs, config.pad_token_id_added)
        hidden = teacher_forced_hidden(model, teacher_forced_embeds(model, batch.token_ids, batch.image_mask, batch.image_values))
        positions = batch.condition_positions[..., None].expand(-1, -1, hidden.shape[-1])
        with plain_linears(model):
            conditions = model.image_out_projector(hidden.gather(1, positions))
        loss = flow_matching_loss(
            model, conditions.reshape(-1, hidden.shape[-1]), batch.targets.reshape(-1, config.token_dim), FLOW_REPEATS, generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(f"model step {step}/{steps} loss {recent:.4f}", started)
    model.requires_grad_(False)
    return model.eval(), losses


def write_demo_checkpoint(directory: Path, config: NextStepConfig, model: NextStepModel, vae: AutoencoderKL, info: dict) -> None:
    """config.json, model.safetensors, tokenizer files, vae/ and training.json (how it was made)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json(config, config.family), indent=2) + "\n", encoding="utf-8")
    write_weights(directory, model.state_dict(), shards=1)
    write_tiny_tokenizer(directory, config)
    save_vae(directory / config.vae_name_or_path, vae, DEMO_VAE)
    (directory / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"checkpoint directory (default {WEIGHTS_DIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4500, help="NextStep training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--t2i-pictures", type=int, default=16000, help="text-to-image training pictures")
    parser.add_argument("--edit-pairs", type=int, default=8000, help="edit training pairs")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = demo_config()
    vae = train_vae(args.seed, args.vae_steps, args.vae_batch_size, started)
    vae_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="nextstep-demo-tokenizer-") as tmp:
        tokenizer = TextTokenizer.from_dir(write_tiny_tokenizer(Path(tmp), config))
    model, losses = train_model(
        config, tokenizer, vae, args.seed, args.steps, args.batch_size, args.t2i_pictures, args.edit_pairs, started
    )
    info = {
        **{name: value for name, value in vars(args).items() if name != "out"},
        "vae_seconds": round(vae_seconds),
        "total_seconds": round(time.perf_counter() - started),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
    }
    write_demo_checkpoint(args.out, config, model, vae, info)
    log(f"wrote {args.out}", started)


if __name__ == "__main__":
    main()
