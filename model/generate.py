"""Render images with the reference generator.

    python -m model.generate --model tiny --prompt "a red circle" --size 64x64 --out out.png
    python -m model.generate --model /ckpt/NextStep-1-Large-Edit --image dog.jpg \\
        --prompt "<image>Add a pirate hat to the dog." --negative-prompt "Copy original image." --out hat.png

Unset sampling flags take the checkpoint family's published defaults (NextStep-1-Large,
NextStep-1-Large-Edit when --image is given, or NextStep-1.1). Upstream's examples also pass
--positive-prompt "masterpiece, film grained, best quality." and a long negative prompt for T2I.
With --n > 1, image i is written as OUT with "-i" before the suffix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from .bundle import load_bundle
from .reference import GenerationRequest, with_overrides
from .sampling import GUIDANCE_SCHEDULES, SAMPLERS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x512, got {text!r}") from None
    return width, height


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="model directory, or a preset: tiny, nextstep-1-large, nextstep-1.1")
    p.add_argument("--vae", help="VAE directory (default: the config's vae_name_or_path, else MODEL/vae)")
    p.add_argument("--prompt", required=True, help='caption; an edit caption holds "<image>" once')
    p.add_argument("--negative-prompt", default="", help="text of the unconditional branch (default: empty)")
    p.add_argument("--positive-prompt", help="appended to the caption after one space")
    p.add_argument("--image", type=Path, help="input image for an edit")
    p.add_argument(
        "--size", type=parse_size, default=None,
        help="WxH, multiples of 16 (default: the model's native size, 512x512 for NextStep-1-Large)",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--steps", type=int, help="sampling steps per token")
    p.add_argument("--guidance-scale", type=float, help="text guidance (cfg)")
    p.add_argument("--image-guidance-scale", type=float, help="image guidance (cfg_img), edits only")
    p.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES)
    p.add_argument("--sampler", choices=SAMPLERS)
    p.add_argument("--timesteps-shift", type=float)
    p.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        bundle = load_bundle(args.model, args.vae, device=args.device, dtype=DTYPES[args.dtype])
        width, height = args.size or (bundle.config.native_image_size,) * 2
        params = with_overrides(
            bundle.sampling_defaults.params(edit=args.image is not None),
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            image_guidance_scale=args.image_guidance_scale,
            guidance_schedule=args.guidance_schedule,
            sampler=args.sampler,
            timesteps_shift=args.timesteps_shift,
            use_norm=args.use_norm,
        )
        image = Image.open(args.image) if args.image else None
        request = GenerationRequest(
            prompt=args.prompt,
            width=width,
            height=height,
            params=params,
            n=args.n,
            seed=args.seed,
            negative_prompt=args.negative_prompt,
            positive_prompt=args.positive_prompt,
            image=image,
        )
        started = time.perf_counter()
        result = bundle.reference_generator().generate(request)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, picture in zip(output_paths(args.out, args.n), result.to_pil()):
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
        print(path)
    print(f"{args.n} image(s) {width}x{height} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
