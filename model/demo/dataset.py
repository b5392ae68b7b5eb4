"""Reproducible examples for training and evaluation: the same seed gives the same examples.

A fixed 10% of attribute combinations (scenes.is_held_out) never appears in training: a held-out
scene is never a training picture (not even inside an edit), and a held-out edit combination
(source attributes + instruction) is never a training edit. Evaluation draws only from those.
Training captions come in four forms (full, without background, without positions, bare objects)
so short prompts such as "a red circle" work too; evaluation captions are always full.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .edits import EDIT_KINDS, Edit, possible_kinds, random_edit
from .scenes import Scene, caption, is_held_out, random_scene

# (with_positions, with_background) -> share of training captions
CAPTION_FORMS = {(True, True): 0.6, (False, True): 0.15, (True, False): 0.15, (False, False): 0.1}
TWO_OBJECT_SHARE = 0.4
# object count of an edit's source scene by kind (None: one or two)
EDIT_SOURCE_OBJECTS = {"recolour": None, "move": 1, "background": None, "add": 1, "remove": 2}


@dataclass(frozen=True)
class TextToImageExample:
    scene: Scene
    caption: str


def _object_count(rng: np.random.Generator) -> int:
    return 2 if rng.random() < TWO_OBJECT_SHARE else 1


def _scene_in_split(rng: np.random.Generator, num_objects: int, held_out: bool) -> Scene:
    while True:
        scene = random_scene(rng, num_objects)
        if is_held_out(scene.key()) == held_out:
            return scene


def text_to_image_examples(seed: int, count: int, held_out: bool = False) -> list[TextToImageExample]:
    """`count` scenes with captions: training (mixed caption forms) or held-out (full captions)."""
    rng = np.random.default_rng([seed, 1])
    forms = list(CAPTION_FORMS)
    shares = list(CAPTION_FORMS.values())
    examples = []
    for _ in range(count):
        scene = _scene_in_split(rng, _object_count(rng), held_out)
        with_positions, with_background = (True, True) if held_out else forms[rng.choice(len(forms), p=shares)]
        examples.append(TextToImageExample(scene, caption(scene, with_positions, with_background)))
    return examples


def edit_examples(seed: int, count: int, held_out: bool = False) -> list[Edit]:
    """`count` edits, kinds in turn (recolour, move, background, add, remove, recolour, ...)."""
    rng = np.random.default_rng([seed, 2])
    return [_edit_in_split(rng, EDIT_KINDS[i % len(EDIT_KINDS)], held_out) for i in range(count)]


def _edit_in_split(rng: np.random.Generator, kind: str, held_out: bool) -> Edit:
    while True:
        num_objects = EDIT_SOURCE_OBJECTS[kind] or _object_count(rng)
        source = random_scene(rng, num_objects)
        if kind not in possible_kinds(source):
            continue
        edit = random_edit(rng, source, kind)
        if held_out and is_held_out(edit.key()):
            return edit
        unseen = is_held_out(edit.key()) or is_held_out(source.key()) or is_held_out(edit.target.key())
        if not held_out and not unseen:
            return edit
