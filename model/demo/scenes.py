"""Pictures of coloured shapes and their captions: the demo model's whole world.

A scene is a background colour and one or two objects (colour, shape, position). Two objects sit at
opposite positions (left and right, or top and bottom) so they never overlap. Each object also has a
size and a small offset from its anchor: drawing detail that captions do not mention.

Caption grammar (what `caption` writes; the model is trained on all of its forms):

    caption  := objects [", on a " COLOUR " background"]
    objects  := object [" and " object]
    object   := ("a" | "an") " " COLOUR " " SHAPE [" " PLACE]
    COLOUR   := red | green | blue | yellow | orange | purple | black | white
    SHAPE    := circle | square | triangle
    PLACE    := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"

e.g. "a red circle on the left and a blue square on the right, on a yellow background".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger, then box-filtered down: anti-aliased edges like a photo of the shape

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (20, 50, 230),
    "yellow": (250, 230, 30),
    "orange": (250, 130, 10),
    "purple": (150, 40, 190),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# position -> (x, y) centre of the object's bounding box, in pixels of the 64x64 image
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
POSITIONS = tuple(ANCHORS)
PLACE_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SIZE_RANGE = (18.0, 24.0)  # bounding-box side, pixels
MAX_OFFSET = 2.0  # pixels the object may sit away from its anchor, each axis
HELD_OUT_FRACTION = 0.1


class SceneError(ValueError):
    """A scene that breaks the demo world's rules."""


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str
    size: float = 22.0
    offset: tuple[float, float] = (0.0, 0.0)

    def attributes(self) -> tuple[str, str, str]:
        """What a caption says about the object: (colour, shape, position)."""
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in PALETTE:
            raise SceneError(f"unknown background colour {self.background!r}")
        if len(self.objects) not in (1, 2):
            raise SceneError(f"a scene holds one or two objects, got {len(self.objects)}")
        for obj in self.objects:
            if obj.colour not in PALETTE or obj.shape not in SHAPES or obj.position not in ANCHORS:
                raise SceneError(f"unknown object {obj.attributes()}")
            if obj.colour == self.background:
                raise SceneError(f"a {obj.colour} object on a {obj.colour} background is invisible")
        if len(self.objects) == 2 and OPPOSITE.get(self.objects[0].position) != self.objects[1].position:
            raise SceneError("two objects must sit at opposite positions (left/right or top/bottom)")

    def key(self) -> str:
        """The scene's captioned attributes as text (drawing details left out): names a combination."""
        objects = " + ".join(" ".join(obj.attributes()) for obj in self.objects)
        return f"{objects} | {self.background}"

    def with_objects(self, objects: tuple[SceneObject, ...]) -> Scene:
        return replace(self, objects=objects)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, with_positions: bool = True, with_background: bool = True) -> str:
    """The scene's caption in the module's grammar; positions and background may be left out."""
    phrases = []
    for obj in scene.objects:
        phrase = f"{article(obj.colour)} {obj.colour} {obj.shape}"
        phrases.append(f"{phrase} {PLACE_PHRASES[obj.position]}" if with_positions else phrase)
    text = " and ".join(phrases)
    return f"{text}, on {article(scene.background)} {scene.background} background" if with_background else text


def is_held_out(key: str) -> bool:
    """Whether a combination (a Scene.key(), or an edit's key) is kept out of training: a fixed 10%."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELD_OUT_FRACTION


def random_object(rng: np.random.Generator, colour: str, shape: str, position: str) -> SceneObject:
    """An object with a random size and offset (the drawing details)."""
    size = float(rng.uniform(*SIZE_RANGE))
    offset = tuple(float(v) for v in rng.uniform(-MAX_OFFSET, MAX_OFFSET, size=2))
    return SceneObject(colour, shape, position, size, offset)


def random_colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    choices = [c for c in COLOURS if c not in exclude]
    return choices[int(rng.integers(len(choices)))]


def random_scene(rng: np.random.Generator, num_objects: int) -> Scene:
    """A uniformly random valid scene with `num_objects` (1 or 2) objects."""
    background = random_colour(rng)
    if num_objects == 1:
        positions = [POSITIONS[int(rng.integers(len(POSITIONS)))]]
    elif num_objects == 2:
        first = ("left", "top")[int(rng.integers(2))]
        positions = [first, OPPOSITE[first]]
        if rng.integers(2):
            positions.reverse()
    else:
        raise SceneError(f"a scene holds one or two objects, got {num_objects}")
    objects = tuple(
        random_object(rng, random_colour(rng, (background,)), SHAPES[int(rng.integers(len(SHAPES)))], position)
        for position in positions
    )
    return Scene(background, objects)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB picture."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x, y = ANCHORS[obj.position]
        cx, cy = (x + obj.offset[0]) * SUPERSAMPLE, (y + obj.offset[1]) * SUPERSAMPLE
        half = obj.size * SUPERSAMPLE / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        else:  # apex up, base along the bottom of the box
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
