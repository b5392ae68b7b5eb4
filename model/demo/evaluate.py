"""How often the demo model draws what it is told, per attribute, with and without guidance.

    python -m model.demo.evaluate                              # reference generator, committed weights
    python -m model.demo.evaluate --url http://127.0.0.1:8000  # through a running server's HTTP API

Prompts are held-out caption combinations and held-out edits (never seen in training, see
dataset.py), rendered at 64x64 with the model's default sampling settings, once as they are and
once with guidance 1.0 (no guidance; for edits both text and image guidance 1.0). The checker reads
each picture back; an attribute counts per expected object (colour, shape, position) or per picture
(background, count); "all" means the whole picture is right. For edits the expected picture is the
edited scene, so "all" means the instruction was followed and nothing else changed.
"""

from __future__ import annotations

import argparse
import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, replace

from PIL import Image

from model.bundle import ModelBundle, load_bundle
from model.prompts import edit_caption
from model.reference import GenerationRequest

from . import WEIGHTS_DIR
from .checker import ATTRIBUTES, read_image, score
from .dataset import edit_examples, text_to_image_examples
from .scenes import IMAGE_SIZE, Scene, render

EVAL_SEED = 1234
SIZE = f"{IMAGE_SIZE}x{IMAGE_SIZE}"

# (prompt, input image or None, seed, guidance or None for the default) -> the picture
Renderer = Callable[[str, Image.Image | None, int, float | None], Image.Image]


def reference_renderer(bundle: ModelBundle) -> Renderer:
    """Render with the in-process reference generator and the model's default sampling settings."""
    generator = bundle.reference_generator()

    def render_one(prompt: str, image: Image.Image | None, seed: int, guidance: float | None) -> Image.Image:
        params = bundle.sampling_defaults.params(edit=image is not None)
        if guidance is not None:
            params = replace(params, guidance_scale=guidance, image_guidance_scale=guidance)
        if image is not None:
            prompt = edit_caption(prompt)  # as the server does for an edit
        request = GenerationRequest(prompt=prompt, width=IMAGE_SIZE, height=IMAGE_SIZE, params=params, seed=seed, image=image)
        return generator.generate(request).to_pil()[0]

    return render_one


def http_renderer(url: str, api_key: str | None = None) -> Renderer:
    """Render through a server's OpenAI-compatible Images API (only size and seed set, unless guidance)."""
    import httpx  # a dev dependency: only this path needs it

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600.0)

    def render_one(prompt: str, image: Image.Image | None, seed: int, guidance: float | None) -> Image.Image:
        fields: dict = {"prompt": prompt, "size": SIZE, "seed": seed}
        if guidance is not None:
            fields["guidance_scale"] = guidance
            if image is not None:
                fields["image_guidance_scale"] = guidance
        if image is None:
            response = client.post("/v1/images/generations", json=fields)
        else:
            png = io.BytesIO()
            image.save(png, format="PNG")
            data = {key: str(value) for key, value in fields.items()}
            response = client.post("/v1/images/edits", data=data, files={"image": ("input.png", png.getvalue(), "image/png")})
        response.raise_for_status()
        return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB")

    return render_one


def accuracy(checks: dict[str, list[bool]]) -> dict[str, float]:
    return {name: sum(values) / len(values) for name, values in checks.items() if values}


@dataclass(frozen=True)
class Case:
    prompt: str
    image: Image.Image | None  # edit input
    expected: Scene
    group: str  # "text-to-image" or the edit kind


def evaluate_cases(renderer: Renderer, cases: list[Case], guidance: float | None, seed: int = EVAL_SEED) -> dict[str, float]:
    """attribute -> accuracy over the cases, plus "all" (whole picture right) and "all: GROUP" per group.

    Case i is rendered with seed + i; guidance None keeps the model's default.
    """
    checks: dict[str, list[bool]] = {name: [] for name in (*ATTRIBUTES, "all")}
    for i, case in enumerate(cases):
        result = score(case.expected, read_image(renderer(case.prompt, case.image, seed + i, guidance)))
        for name, values in result.items():
            checks[name].extend(values)
        right = all(all(values) for values in result.values())
        checks["all"].append(right)
        checks.setdefault(f"all: {case.group}", []).append(right)
    return accuracy(checks)


def text_to_image_cases(count: int) -> list[Case]:
    examples = text_to_image_examples(EVAL_SEED, count, held_out=True)
    return [Case(example.caption, None, example.scene, "text-to-image") for example in examples]


def edit_cases(count: int) -> list[Case]:
    """`count` held-out edits, the kinds in turn."""
    return [Case(e.instruction, render(e.source), e.target, e.kind) for e in edit_examples(EVAL_SEED, count, held_out=True)]


def format_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """rows: label -> column -> accuracy -> aligned text table."""
    width = max(len(label) for label in rows) + 2
    lines = ["".ljust(width) + "".join(c.rjust(14) for c in columns)]
    for label, values in rows.items():
        lines.append(label.ljust(width) + "".join(f"{values.get(c, float('nan')):14.2f}" for c in columns))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model.demo.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(WEIGHTS_DIR), help="model directory (default: the committed demo)")
    parser.add_argument("--url", help="evaluate through this server's HTTP API instead of in process")
    parser.add_argument("--api-key", help="bearer token for --url")
    parser.add_argument("--prompts", type=int, default=100, help="held-out text-to-image prompts")
    parser.add_argument("--edits", type=int, default=50, help="held-out edits")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (in-process only)")
    parser.add_argument(
        "--guidance", type=float, action="append", help="guidance scale compared with the default (repeatable; default 1.0)"
    )
    args = parser.parse_args(argv)

    if args.url:
        renderer = http_renderer(args.url, args.api_key)
    else:
        import torch

        torch.set_num_threads(args.threads)
        renderer = reference_renderer(load_bundle(args.model))
    settings = {"default": None, **{f"guidance {g:g}": g for g in args.guidance or [1.0]}}
    for title, cases in (("text-to-image", text_to_image_cases(args.prompts)), ("edits", edit_cases(args.edits))):
        if not cases:
            continue
        results = {label: evaluate_cases(renderer, cases, guidance) for label, guidance in settings.items()}
        rows = {name: {label: results[label].get(name, float("nan")) for label in settings} for name in results["default"]}
        print(f"{title}: {len(cases)} held-out prompts, accuracy per attribute")
        print(format_table(rows, list(settings)))
        print()


if __name__ == "__main__":
    main()
