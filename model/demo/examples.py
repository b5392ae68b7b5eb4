"""Render the README's example pictures with the committed demo model (default sampling settings).

    python -m model.demo.examples   # writes model/demo/examples/*.png and prints the README table

Pictures are 64x64, saved at 128x128 (nearest neighbour) so they are visible on a page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from model.bundle import load_bundle

from . import WEIGHTS_DIR
from .evaluate import reference_renderer
from .scenes import Scene, SceneObject, render

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DISPLAY_SIZE = 128

TEXT_TO_IMAGE = (
    "a red circle on the left, on a yellow background",
    "a blue triangle at the top, on a white background",
    "a green square in the center, on a black background",
    "a purple circle on the left and an orange triangle on the right, on a blue background",
    "a white square at the top and a red circle at the bottom, on a green background",
    "a yellow triangle",
)
EDIT_SOURCE = Scene("white", (SceneObject("blue", "square", "left", 22.0),))
EDITS = ("make the square red", "move the square to the right", "change the background to black",
         "add a yellow circle on the right")  # fmt: skip


def save(image: Image.Image, path: Path) -> str:
    image.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST).save(path, format="PNG")
    return path.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.demo.examples", description=__doc__)
    parser.add_argument("--model", default=str(WEIGHTS_DIR))
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    renderer = reference_renderer(load_bundle(args.model))
    rows = ["| prompt | picture |", "| --- | --- |"]
    for i, prompt in enumerate(TEXT_TO_IMAGE):
        name = save(renderer(prompt, None, args.seed, None), args.out / f"t2i-{i}.png")
        rows.append(f"| {prompt} | ![{prompt}](model/demo/examples/{name}) |")
    source = render(EDIT_SOURCE)
    source_name = save(source, args.out / "edit-source.png")
    rows += ["", "| input | instruction | output |", "| --- | --- | --- |"]
    for i, instruction in enumerate(EDITS):
        name = save(renderer(instruction, source, args.seed, None), args.out / f"edit-{i}.png")
        rows.append(f"| ![input](model/demo/examples/{source_name}) | {instruction} | ![{instruction}](model/demo/examples/{name}) |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
