"""Prompt token sequences for the guidance branches of one image (the contract's "Prompt layout").

Every sequence ends with the output image's area text and `boi`; the image tokens are generated after it.
An edit's input image enters the caption at "<image>" as area text + boi + one placeholder id per input
token + eoi; `image_positions` says where the placeholders are, so the caller can put the projected
input latents there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import FAMILY_V11, NextStepConfig
from .tokenizer import IMAGE_AREA_TOKEN, TextTokenizer

IMAGE_MARKER = "<image>"


class PromptError(ValueError):
    """A caption, prompt option or grid size that cannot be turned into prompt tokens."""


@dataclass(frozen=True)
class PromptSequence:
    """One branch's prompt ids and the indices of its input-image placeholders (raster order)."""

    token_ids: tuple[int, ...]
    image_positions: tuple[int, ...] = ()


def edit_caption(instruction: str) -> str:
    """An edit's caption: the instruction after the input image's marker, unless it places the marker itself."""
    return instruction if IMAGE_MARKER in instruction else IMAGE_MARKER + instruction


def area_text(grid_h: int, grid_w: int) -> str:
    """The image-size text of a grid_h x grid_w token grid, e.g. "<|image_area|>32*32"."""
    _check_grid(grid_h, grid_w)
    return f"{IMAGE_AREA_TOKEN}{grid_h}*{grid_w}"


def build_prompt_branches(
    tokenizer: TextTokenizer,
    config: NextStepConfig,
    caption: str,
    grid_h: int,
    grid_w: int,
    *,
    num_branches: int,
    negative_prompt: str = "",
    positive_prompt: str | None = None,
    input_grid: tuple[int, int] | None = None,
) -> tuple[PromptSequence, ...]:
    """The prompts of one image's guidance branches, in the order the guidance formulas use them.

    Text-to-image: 1 -> (cond,), 2 -> (cond, uncond) with the negative prompt as the uncond caption.
    Edit (`input_grid` = (gh, gw) of the input image, caption with one "<image>"):
      1 -> (cond,); 2 -> (cond, uncond_image): text guidance only, so the uncond keeps the image and
      drops the instruction; 3 -> (cond, uncond_image, uncond_none), uncond_none has no image.
    NextStep-1.1 prepends the tokenizer's BOS (if it has one) to each caption, never to the area text.
    """
    _check_text("caption", caption)
    _check_text("negative_prompt", negative_prompt)
    if positive_prompt is not None:
        _check_text("positive_prompt", positive_prompt)
    if not isinstance(num_branches, int) or isinstance(num_branches, bool) or not 1 <= num_branches <= 3:
        raise PromptError(f"num_branches must be 1, 2 or 3, got {num_branches!r}")
    for name, text in (("negative_prompt", negative_prompt), ("positive_prompt", positive_prompt or "")):
        if IMAGE_MARKER in text:
            raise PromptError(f"{name} must not contain {IMAGE_MARKER!r}")

    _check_grid(grid_h, grid_w)
    cond_caption = caption + (" " + positive_prompt if positive_prompt else "")
    if input_grid is None:
        if IMAGE_MARKER in caption:
            raise PromptError(f"the caption contains {IMAGE_MARKER!r} but no input image was given")
        if num_branches == 3:
            raise PromptError("3 guidance branches (text and image guidance) need an input image")
        builder = _BranchBuilder(tokenizer, config, (grid_h, grid_w), input_grid=None)
        branches = [builder.sequence(cond_caption), builder.sequence(negative_prompt)]
        return tuple(branches[:num_branches])

    if not (isinstance(input_grid, tuple) and len(input_grid) == 2):
        raise PromptError(f"input_grid must be a (grid_h, grid_w) tuple, got {input_grid!r}")
    _check_grid(*input_grid)
    if caption.count(IMAGE_MARKER) != 1:
        raise PromptError(
            f"an edit caption must contain {IMAGE_MARKER!r} exactly once, found {caption.count(IMAGE_MARKER)}"
        )
    builder = _BranchBuilder(tokenizer, config, (grid_h, grid_w), input_grid)
    branches = [
        builder.sequence(cond_caption),
        builder.sequence(IMAGE_MARKER + negative_prompt),
        builder.sequence(negative_prompt),
    ]
    return tuple(branches[:num_branches])


def _check_text(name: str, text: object) -> None:
    if not isinstance(text, str):
        raise PromptError(f"{name} must be a string, got {type(text).__name__}")


def _check_grid(grid_h: object, grid_w: object) -> None:
    for value in (grid_h, grid_w):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PromptError(f"image token grid must be positive integers, got {grid_h!r} x {grid_w!r}")


class _BranchBuilder:
    """Turns one branch's caption (with at most one "<image>") into its prompt sequence."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        config: NextStepConfig,
        output_grid: tuple[int, int],
        input_grid: tuple[int, int] | None,
    ):
        self.tokenizer = tokenizer
        self.config = config
        self.output_area_ids = tokenizer.encode(area_text(*output_grid))
        self.bos_ids = [tokenizer.bos_id] if config.family == FAMILY_V11 and tokenizer.bos_id is not None else []
        self.input_grid = input_grid

    def sequence(self, caption: str) -> PromptSequence:
        before, marker, after = caption.partition(IMAGE_MARKER)
        ids = self.bos_ids + self._encode_user_text(before)
        positions: list[int] = []
        if marker:
            num_input_tokens = self.input_grid[0] * self.input_grid[1]
            ids += self.tokenizer.encode(area_text(*self.input_grid)) + [self.config.boi]
            positions = list(range(len(ids), len(ids) + num_input_tokens))
            ids += [self.config.image_placeholder_id] * num_input_tokens + [self.config.eoi]
            ids += self._encode_user_text(after)
        ids += self.output_area_ids + [self.config.boi]
        return PromptSequence(token_ids=tuple(ids), image_positions=tuple(positions))

    def _encode_user_text(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        # Placeholders mark input-image slots; one typed into the text would take an image latent's place.
        if self.config.image_placeholder_id in ids:
            raise PromptError("prompt text must not contain the image placeholder token")
        return ids
