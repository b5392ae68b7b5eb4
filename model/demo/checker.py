"""Read a 64x64 picture back into scene attributes: deterministic, no learning involved.

1. Every pixel takes its nearest palette colour; the most common one is the background.
2. Pixels far from the background's measured colour are object pixels; after a 3x3 opening (which
   drops speckles), each 4-connected blob of at least MIN_OBJECT_PIXELS of them is an object.
3. An object's colour is the most common palette colour of its pixels (background excluded); its
   position the anchor nearest its bounding-box centre; its shape comes from geometry: a triangle
   (apex up) holds about three times more pixels in the lower half of its box than in the upper,
   a square fills its bounding box, a circle fills about pi/4 of it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import ANCHORS, COLOURS, PALETTE, Scene

MIN_OBJECT_PIXELS = 25
OBJECT_DISTANCE = 60.0  # RGB distance from the background colour that makes a pixel an object pixel
TRIANGLE_LOWER_UPPER_RATIO = 1.7
SQUARE_MIN_FILL = 0.88

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    position: str
    pixels: int
    center: tuple[float, float]  # bounding-box centre (x, y)


@dataclass(frozen=True)
class Reading:
    """What the checker sees: the background colour and the objects, largest first."""

    background: str
    objects: tuple[DetectedObject, ...]


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A PIL image or uint8 [H, W, 3] array -> float32 [H, W, 3]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {array.shape}")
    return array.astype(np.float32)


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """pixels: float32 [..., 3] -> int [...] index into COLOURS of the nearest palette colour."""
    distances = np.linalg.norm(pixels[..., None, :] - _PALETTE_RGB, axis=-1)
    return distances.argmin(axis=-1)


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """The background colour and objects of a picture (any size; positions assume 64x64 anchors)."""
    pixels = as_array(image)
    classes = nearest_colours(pixels)
    background = int(np.bincount(classes.ravel(), minlength=len(COLOURS)).argmax())
    background_rgb = np.median(pixels[classes == background], axis=0)
    mask = open_mask(np.linalg.norm(pixels - background_rgb, axis=-1) > OBJECT_DISTANCE)
    objects = [
        _describe(blob, classes, background)
        for blob in connected_components(mask)
        if len(blob[0]) >= MIN_OBJECT_PIXELS
    ]
    objects.sort(key=lambda obj: -obj.pixels)
    return Reading(COLOURS[background], tuple(objects))


def _shifted_3x3(mask: np.ndarray, combine) -> np.ndarray:
    """combine (np.logical_and / np.logical_or) of the 9 one-pixel shifts of mask, edges padded with False."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    result = padded[1 : height + 1, 1 : width + 1].copy()
    for dr in range(3):
        for dc in range(3):
            result = combine(result, padded[dr : dr + height, dc : dc + width])
    return result


def open_mask(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: drops stray pixels and hairlines, keeps shapes' corners."""
    return _shifted_3x3(_shifted_3x3(mask, np.logical_and), np.logical_or)


def connected_components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """mask: bool [H, W] -> the (rows, cols) index arrays of each 4-connected blob of True pixels."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, rows, cols = deque([start]), [], []
        while queue:
            r, c = queue.popleft()
            rows.append(r)
            cols.append(c)
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        blobs.append((np.array(rows), np.array(cols)))
    return blobs


def classify_shape(rows: np.ndarray, cols: np.ndarray) -> str:
    """circle, square or triangle from a blob's pixel coordinates."""
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    fill = len(rows) / ((bottom - top + 1) * (right - left + 1))
    middle = (top + bottom) / 2
    upper, lower = np.count_nonzero(rows < middle), np.count_nonzero(rows > middle)
    if lower > TRIANGLE_LOWER_UPPER_RATIO * max(upper, 1):
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def nearest_position(x: float, y: float) -> str:
    return min(ANCHORS, key=lambda name: (ANCHORS[name][0] - x) ** 2 + (ANCHORS[name][1] - y) ** 2)


def _describe(blob: tuple[np.ndarray, np.ndarray], classes: np.ndarray, background: int) -> DetectedObject:
    rows, cols = blob
    counts = np.bincount(classes[rows, cols], minlength=len(COLOURS))
    counts[background] = 0
    center = ((cols.min() + cols.max()) / 2 + 0.5, (rows.min() + rows.max()) / 2 + 0.5)
    return DetectedObject(
        colour=COLOURS[int(counts.argmax())],
        shape=classify_shape(rows, cols),
        position=nearest_position(*center),
        pixels=len(rows),
        center=(float(center[0]), float(center[1])),
    )


# Attributes scored per expected object, and for the whole picture.
OBJECT_ATTRIBUTES = ("colour", "shape", "position")
ATTRIBUTES = ("background",) + OBJECT_ATTRIBUTES + ("count",)


def score(expected: Scene, reading: Reading) -> dict[str, list[bool]]:
    """attribute -> one bool per check: background and count once, colour/shape/position per expected object.

    Each expected object is matched to the unused detected object whose centre is nearest its anchor;
    with none left, its attributes count as wrong.
    """
    results: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    results["background"].append(reading.background == expected.background)
    results["count"].append(len(reading.objects) == len(expected.objects))
    unused = list(reading.objects)
    for obj in expected.objects:
        if not unused:
            for name in OBJECT_ATTRIBUTES:
                results[name].append(False)
            continue
        ax, ay = ANCHORS[obj.position]
        match = min(unused, key=lambda d: (d.center[0] - ax) ** 2 + (d.center[1] - ay) ** 2)
        unused.remove(match)
        for name in OBJECT_ATTRIBUTES:
            results[name].append(getattr(match, name) == getattr(obj, name))
    return results


def matches(expected: Scene, reading: Reading) -> bool:
    """Whether the picture shows exactly the expected scene (every attribute right)."""
    return all(all(checks) for checks in score(expected, reading).values())
