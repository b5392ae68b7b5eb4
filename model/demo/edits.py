"""Edit instructions: one scene -> another, with the instruction a user would type.

Instruction grammar (what `random_edit` writes; PLACE, COLOUR and SHAPE as in scenes.py):

    "make the " SHAPE " " COLOUR          recolour the only object of that shape
    "move the " SHAPE " to the " SPOT     one-object scenes; SPOT := left | right | top | bottom | center
    "change the background to " COLOUR    to a colour no object has
    "add " ("a" | "an") " " COLOUR " " SHAPE " " PLACE
                                          one-object scenes with the object off-center; PLACE is opposite it
    "remove the " SHAPE                   two-object scenes whose shapes differ

Everything the instruction does not mention (other objects, sizes, offsets) stays as it was; a moved
object keeps its offset from its anchor.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .scenes import OPPOSITE, PLACE_PHRASES, POSITIONS, SHAPES, Scene, article, random_colour, random_object

EDIT_KINDS = ("recolour", "move", "background", "add", "remove")


@dataclass(frozen=True)
class Edit:
    kind: str
    instruction: str
    source: Scene
    target: Scene

    def key(self) -> str:
        """The combination this edit names (source attributes + instruction), for held-out splits."""
        return f"{self.source.key()} -> {self.instruction}"


def possible_kinds(scene: Scene) -> tuple[str, ...]:
    """The edit kinds that apply to `scene`."""
    shapes = [obj.shape for obj in scene.objects]
    kinds = ["background"]
    if any(shapes.count(shape) == 1 for shape in shapes):
        kinds.append("recolour")
    if len(scene.objects) == 1:
        kinds.append("move")
        if scene.objects[0].position != "center":
            kinds.append("add")
    elif shapes[0] != shapes[1]:
        kinds.append("remove")
    return tuple(k for k in EDIT_KINDS if k in kinds)


def random_edit(rng: np.random.Generator, scene: Scene, kind: str) -> Edit:
    """A random edit of `kind` (one of possible_kinds(scene)) applied to `scene`."""
    if kind not in possible_kinds(scene):
        raise ValueError(f"a {kind!r} edit does not apply to the scene {scene.key()!r}")
    objects = scene.objects
    if kind == "recolour":
        shapes = [obj.shape for obj in objects]
        index = _pick_unique_shape(rng, shapes)
        obj = objects[index]
        colour = random_colour(rng, (obj.colour, scene.background))
        changed = objects[:index] + (replace(obj, colour=colour),) + objects[index + 1 :]
        return Edit(kind, f"make the {obj.shape} {colour}", scene, scene.with_objects(changed))
    if kind == "move":
        obj = objects[0]
        spots = [p for p in POSITIONS if p != obj.position]
        spot = spots[int(rng.integers(len(spots)))]
        return Edit(kind, f"move the {obj.shape} to the {spot}", scene, scene.with_objects((replace(obj, position=spot),)))
    if kind == "background":
        colour = random_colour(rng, (scene.background, *(obj.colour for obj in objects)))
        return Edit(kind, f"change the background to {colour}", scene, replace(scene, background=colour))
    if kind == "add":
        position = OPPOSITE[objects[0].position]
        colour = random_colour(rng, (scene.background,))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        new = random_object(rng, colour, shape, position)
        text = f"add {article(colour)} {colour} {shape} {PLACE_PHRASES[position]}"
        return Edit(kind, text, scene, scene.with_objects(objects + (new,)))
    index = int(rng.integers(2))  # remove
    kept = objects[1 - index]
    return Edit(kind, f"remove the {objects[index].shape}", scene, scene.with_objects((kept,)))


def _pick_unique_shape(rng: np.random.Generator, shapes: list[str]) -> int:
    """Index of a random object whose shape no other object has (so "the circle" names one object)."""
    unique = [i for i, shape in enumerate(shapes) if shapes.count(shape) == 1]
    if not unique:
        raise ValueError("no object has a shape of its own to name")
    return unique[int(rng.integers(len(unique)))]

