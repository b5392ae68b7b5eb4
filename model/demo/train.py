"""Train the demo model from scratch and write it in the published checkpoint layout.

    python -m model.demo.train --vae-only --out /tmp/demo          # the VAE: ~25 minutes, one CPU thread
    python -m model.demo.train --device cuda --workers 5 --vae /tmp/demo/vae --out /tmp/demo   # ~8 min, H200
    python -m model.demo.train --out /tmp/smoke --vae-steps 50 --steps 50   # a quick smoke run (CPU)

The committed weights (nextstep-demo/) came from the first two commands.

1. VAE: a small FLUX-style AutoencoderKL (f8, 16 latent channels) learns to reconstruct freshly
   drawn scenes: MSE of decoding layer-normalised 2x2 latent patches (encoder_norm, psz 2) plus a
   little noise, so it decodes exactly what the model's use_norm tokens look like. `--vae-only`
   stops after this stage; `--vae DIR` reuses a VAE trained before (same seed: same weights).
2. The training pictures (text-to-image scenes and edit pairs) are drawn once and encoded.
3. NextStep: the decoder, projectors and flow-matching head train together, teacher forced over
   prompt + image tokens in the inference prompt layout, with the flow-matching loss on the head.
   Caption dropout (10%) trains the unconditional branch for text guidance; edits also drop their
   instruction (10%, keeping the image) for image guidance.
   Every image token fed in (teacher-forced outputs, edit inputs) gets noise, then the use_norm
   layer norm, so the model tolerates the errors of its own sampled tokens at inference.
Everything is seeded: the same seed, device and thread count give the same weights (on CUDA with
torch's deterministic algorithms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from model.config import FAMILY_V1, NextStepConfig
from model.latents import decode_image_tokens, encode_image_tokens, encoder_layer_norm, image_to_pixels, pixels_to_uint8
from model.nextstep import NextStepModel
from model.prompts import PromptSequence, build_prompt_branches, edit_caption
from model.sampling import TOKEN_NORM_EPS
from model.sampling_defaults import SAMPLING_DEFAULTS_FILE
from model.tokenizer import TextTokenizer, write_tiny_tokenizer
from model.vae import AutoencoderKL, VAEConfig, load_vae, save_vae
from model.write_checkpoint import config_json, write_weights

from . import WEIGHTS_DIR
from .batches import collate
from .checker import matches, read_image
from .dataset import edit_examples, text_to_image_examples
from .scenes import IMAGE_SIZE, random_scene, render
from .teacher_forcing import flow_matching_loss, plain_linears, teacher_forced_embeds, teacher_forced_hidden

# The demo model: a Qwen2-shaped decoder (MODEL_SIZES), a 3-block head, NextStep-1 family (legacy SDE,
# use_norm, editing); special ids at the top of a 512-token vocabulary, as in the tiny preset.
DEMO_MODEL = dict(
    name="nextstep-demo",
    family=FAMILY_V1,
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
# Decoder sizes; each fits the 25 MB checkpoint budget with the VAE in float32.
MODEL_SIZES = {
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=352),
    "base": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                 intermediate_size=512),
}  # fmt: skip
DEMO_SIZE = "base"  # the committed checkpoint's size
# Deterministic layer-normalised latents: the encoder's output is what use_norm sampling produces.
DEMO_VAE = VAEConfig(
    resolution=IMAGE_SIZE,
    ch=32,
    ch_mult=(2, 2, 2, 2),  # 64 channels at every level: GroupNorm(32) keeps 2 per group, enough to carry colour
    num_res_blocks=1,
    z_channels=16,
    scaling_factor=1.0,
    shift_factor=0.0,
    deterministic=True,
    encoder_norm=True,
    psz=2,
)
# The demo's own sampling defaults (model/sampling_defaults.py): the published guidance 7.5 over-saturates
# so small a model (held-out accuracy of whole pictures 84% at 7.5, 100% at 1.5 and 3).
DEMO_SAMPLING_DEFAULTS = {"text_to_image": {"guidance_scale": 2.0}, "edit": {"guidance_scale": 2.0}}
GRID = IMAGE_SIZE // 16
PATCH = DEMO_MODEL["latent_patch_size"]
VAE_LR = 1e-3
# Noise added to the (unit-scale) latent while training the VAE, so the decoder tolerates the small
# errors of sampled tokens. encoder_norm already fixes the latent's scale, the job a KL term would do.
VAE_LATENT_NOISE = 0.1
TEXT_DROPOUT = 0.1  # text-to-image: train the "" (negative prompt) branch
EDIT_INSTRUCTION_DROPOUT = 0.1  # edit: image without instruction (image guidance's uncond_image)
EDIT_ALL_DROPOUT = 0.05  # edit: neither image nor instruction
EDIT_SHARE = 0.5
FLOW_REPEATS = 4
INPUT_NOISE = 0.3  # std of the noise on image tokens fed in (they are unit-scale: layer-normalised)


def demo_config(size: str = DEMO_SIZE) -> NextStepConfig:
    return NextStepConfig.from_dict({**DEMO_MODEL, **MODEL_SIZES[size]}, name=DEMO_MODEL["name"])


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)


def cosine_lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def render_all(scenes: list, workers: int) -> list:
    """Draw scenes in `workers` processes (drawing is a pure function: same pictures, any worker count)."""
    if workers <= 1:
        return [render(scene) for scene in scenes]
    with Pool(workers) as pool:
        return pool.map(render, scenes, chunksize=256)


def pixels_of(images: list) -> torch.Tensor:
    """PIL images -> [B, 3, 64, 64] in [-1, 1]."""
    return torch.stack([image_to_pixels(image, IMAGE_SIZE, IMAGE_SIZE) for image in images])


def train_vae(seed: int, steps: int, batch_size: int, started: float, device: torch.device) -> AutoencoderKL:
    """Fit DEMO_VAE on freshly drawn training scenes: MSE of decoding the layer-normalised latent plus noise."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(DEMO_VAE).to(device)
    rng = np.random.default_rng([seed, 10])
    generator = torch.Generator().manual_seed(seed + 10)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, VAE_LR, warmup=20)
        scenes = [random_scene(rng, 1 + int(rng.integers(2))) for _ in range(batch_size)]
        pixels = pixels_of([render(scene) for scene in scenes]).to(device)
        mean, _ = vae.encode_moments(pixels)
        latent = encoder_layer_norm(mean, DEMO_VAE.psz)
        noise = torch.randn(latent.shape, generator=generator).to(device)
        reconstruction = vae.decode(latent + VAE_LATENT_NOISE * noise)
        loss = torch.nn.functional.mse_loss(reconstruction, pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} mse {loss.item():.4f}", started)
        if (step + 1) % 500 == 0 or step == steps - 1:
            log(f"vae step {step + 1}: checker reads {reconstruction_accuracy(vae.eval()):.1%} of reconstructions right", started)
            vae.train()
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, count: int = 100) -> float:
    """Share of held-out scenes whose encode -> decode round trip the checker reads exactly right."""
    rng = np.random.default_rng(99)
    scenes = [random_scene(rng, 1 + int(rng.integers(2))) for _ in range(count)]
    tokens = encode(vae, [render(scene) for scene in scenes])
    right = 0
    for scene, image_tokens in zip(scenes, tokens):
        pixels = decode_image_tokens(vae, DEMO_VAE, image_tokens[None], GRID, GRID, DEMO_VAE.z_channels, PATCH)
        right += matches(scene, read_image(pixels_to_uint8(pixels)[0].cpu().numpy()))
    return right / count


@torch.no_grad()
def encode(vae: AutoencoderKL, images: list, chunk: int = 64) -> torch.Tensor:
    """PIL images -> image tokens [B, GRID*GRID, 64] on the CPU, exactly as the reference encodes an edit input."""
    device = next(vae.parameters()).device
    parts = [
        encode_image_tokens(vae, DEMO_VAE, pixels_of(images[i : i + chunk]).to(device), PATCH).cpu()
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


@dataclass(frozen=True)
class ModelTraining:
    """The NextStep stage's settings (the VAE stage has its own flags)."""

    seed: int = 0
    steps: int = 6000
    batch_size: int = 256
    lr: float = 2e-3
    input_noise: float = INPUT_NOISE
    edit_share: float = EDIT_SHARE  # share of edit examples in a batch
    t2i_pictures: int = 40000
    edit_pairs: int = 30000
    workers: int = 1  # processes drawing the training pictures


def noisy_inputs(values: torch.Tensor, mask: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Image tokens fed in (where mask) plus N(0, std^2) noise, layer-normalised again as use_norm tokens are."""
    if std == 0.0:
        return values
    noise = torch.randn(values.shape, generator=generator, device=generator.device)
    noisy = torch.nn.functional.layer_norm(values + std * noise, values.shape[-1:], eps=TOKEN_NORM_EPS)
    return torch.where(mask[..., None], noisy, values)


def train_model(
    config: NextStepConfig, tokenizer: TextTokenizer, vae: AutoencoderKL, plan: ModelTraining, started: float
) -> tuple[NextStepModel, list[float]]:
    seed = plan.seed
    t2i = text_to_image_examples(seed, plan.t2i_pictures)
    edits = edit_examples(seed, plan.edit_pairs)
    t2i_tokens = encode(vae, render_all([example.scene for example in t2i], plan.workers))
    source_tokens = encode(vae, render_all([edit.source for edit in edits], plan.workers))
    target_tokens = encode(vae, render_all([edit.target for edit in edits], plan.workers))
    log(f"encoded {len(t2i)} text-to-image pictures and {len(edits)} edit pairs", started)

    device = next(vae.parameters()).device
    model = init_model(config, seed).to(device)
    book = PromptBook(tokenizer, config)
    rng = np.random.default_rng([seed, 20])
    generator = torch.Generator(device).manual_seed(seed + 20)  # noise drawn where the model trains
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.98)
    )
    losses: list[torch.Tensor] = []
    for step in range(plan.steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, plan.steps, plan.lr, warmup=100)
        prompts, outputs, inputs = [], [], []
        for _ in range(plan.batch_size):
            if rng.random() < plan.edit_share:
                i = int(rng.integers(len(edits)))
                branches = book.branches(edit_caption(edits[i].instruction), edit=True)
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
        batch = collate(prompts, torch.stack(outputs), inputs, config.pad_token_id_added).to(device)
        values = noisy_inputs(batch.image_values, batch.image_mask, plan.input_noise, generator)
        hidden = teacher_forced_hidden(model, teacher_forced_embeds(model, batch.token_ids, batch.image_mask, values))
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
        losses.append(loss.detach())
        if step % 100 == 0 or step == plan.steps - 1:
            recent = torch.stack(losses[-100:]).mean().item()  # the only host sync of a step
            log(f"model step {step}/{plan.steps} loss {recent:.4f}", started)
    model.requires_grad_(False)
    return model.cpu().eval(), torch.stack(losses).tolist()


def write_demo_checkpoint(directory: Path, config: NextStepConfig, model: NextStepModel, vae: AutoencoderKL, info: dict) -> None:
    """config.json, model.safetensors, tokenizer files, vae/, sampling_defaults.json and training.json (how it was made)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json(config, config.family), indent=2) + "\n", encoding="utf-8")
    defaults = json.dumps(DEMO_SAMPLING_DEFAULTS, indent=2) + "\n"
    (directory / SAMPLING_DEFAULTS_FILE).write_text(defaults, encoding="utf-8")
    write_weights(directory, model.state_dict(), shards=1)
    write_tiny_tokenizer(directory, config)
    save_vae(directory / config.vae_name_or_path, vae, vae.config)
    (directory / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = ModelTraining()
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"checkpoint directory (default {WEIGHTS_DIR})")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda, ...")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="processes drawing training pictures")
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default=DEMO_SIZE, help=f"model size (default {DEMO_SIZE})")
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch-size", type=int, default=8)
    parser.add_argument("--vae", type=Path, help="a trained VAE directory to use instead of training one")
    parser.add_argument("--vae-only", action="store_true", help="train the VAE, write OUT/vae and stop")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="NextStep training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (cosine schedule)")
    parser.add_argument("--input-noise", type=float, default=defaults.input_noise, help="noise std on teacher-forced tokens")
    parser.add_argument("--edit-share", type=float, default=defaults.edit_share, help="share of edits in a batch")
    parser.add_argument("--t2i-pictures", type=int, default=defaults.t2i_pictures, help="text-to-image training pictures")
    parser.add_argument("--edit-pairs", type=int, default=defaults.edit_pairs, help="edit training pairs")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":  # reproducible GPU runs: deterministic kernels (cuBLAS needs this before its first call)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns where an op has no deterministic kernel
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = demo_config(args.size)
    if args.vae is not None:
        vae, _ = load_vae(args.vae, config.family, device)
    else:
        vae = train_vae(args.seed, args.vae_steps, args.vae_batch_size, started, device)
        save_vae(args.out / config.vae_name_or_path, vae, DEMO_VAE)
    vae_seconds = time.perf_counter() - started
    if args.vae_only:
        return
    with tempfile.TemporaryDirectory(prefix="nextstep-demo-tokenizer-") as tmp:
        tokenizer = TextTokenizer.from_dir(write_tiny_tokenizer(Path(tmp), config))
    plan = ModelTraining(
        seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr, input_noise=args.input_noise,
        edit_share=args.edit_share, t2i_pictures=args.t2i_pictures, edit_pairs=args.edit_pairs, workers=args.workers,
    )  # fmt: skip
    model, losses = train_model(config, tokenizer, vae, plan, started)
    info = {
        **{name: value for name, value in vars(args).items() if name not in ("out", "vae", "vae_only", "device", "workers")},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vae_seconds": None if args.vae else round(vae_seconds),  # None: trained by an earlier --vae-only run
        "total_seconds": round(time.perf_counter() - started),
        "final_loss": round(sum(losses[-100:]) / max(1, len(losses[-100:])), 4),
    }
    write_demo_checkpoint(args.out, config, model, vae, info)
    log(f"wrote {args.out}", started)


if __name__ == "__main__":
    main()
