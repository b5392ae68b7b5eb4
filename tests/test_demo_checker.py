"""The demo checker reads colours, shapes and positions back from pictures drawn here pixel by pixel."""

import numpy as np
import pytest

from model.demo.checker import read_image, score
from model.demo.scenes import PALETTE, Scene, SceneObject


def canvas(background: str) -> np.ndarray:
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[:, :] = PALETTE[background]
    return image


def paint_square(image, colour, cx, cy, side):
    half = side // 2
    image[cy - half : cy + half, cx - half : cx + half] = PALETTE[colour]


def paint_circle(image, colour, cx, cy, radius):
    for y in range(64):
        for x in range(64):
            if (x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 <= radius**2:
                image[y, x] = PALETTE[colour]


def paint_triangle(image, colour, cx, cy, side):
    """Apex up: row y (top .. bottom of the box) is filled over a width growing linearly to `side`."""
    top = cy - side // 2
    for row in range(side):
        half_width = (row + 1) * side / (2 * side)
        for x in range(64):
            if abs(x + 0.5 - cx) <= half_width:
                image[top + row, x] = PALETTE[colour]


@pytest.mark.parametrize(
    "paint, shape, size",
    [(paint_square, "square", 20), (paint_circle, "circle", 11), (paint_triangle, "triangle", 22)],
)
@pytest.mark.parametrize("position, center", [("left", (16, 32)), ("top", (32, 16)), ("center", (32, 32))])
def test_one_object_is_read_back(paint, shape, size, position, center):
    image = canvas("yellow")
    paint(image, "purple", *center, size)
    reading = read_image(image)
    assert reading.background == "yellow"
    assert [(o.colour, o.shape, o.position) for o in reading.objects] == [("purple", shape, position)]


def test_two_objects_are_read_back_largest_first():
    image = canvas("white")
    paint_square(image, "black", 48, 32, 24)
    paint_circle(image, "orange", 16, 32, 9)
    reading = read_image(image)
    assert [(o.colour, o.shape, o.position) for o in reading.objects] == [
        ("black", "square", "right"),
        ("orange", "circle", "left"),
    ]


def test_background_alone_has_no_objects():
    assert read_image(canvas("blue")).objects == ()


def test_speckles_and_mild_noise_are_not_objects():
    rng = np.random.default_rng(0)
    image = canvas("green").astype(np.int16) + rng.integers(-20, 21, size=(64, 64, 3))
    image[10, 10] = PALETTE["red"]  # a lone pixel
    image[50, 40:43] = PALETTE["red"]  # a short hairline
    reading = read_image(np.clip(image, 0, 255).astype(np.uint8))
    assert reading.background == "green" and reading.objects == ()


def test_colours_are_read_as_the_nearest_palette_colour():
    image = canvas("black")
    paint_square(image, "red", 32, 32, 20)
    image[22:42, 22:42] = (200, 45, 30)  # off-palette, closest to red
    assert read_image(image).objects[0].colour == "red"


def test_score_marks_each_wrong_attribute():
    image = canvas("white")
    paint_square(image, "blue", 48, 32, 20)
    expected = Scene("white", (SceneObject("blue", "circle", "left"),))
    result = score(expected, read_image(image))
    assert result == {"background": [True], "colour": [True], "shape": [False], "position": [False], "count": [True]}


def test_score_counts_missing_objects_as_wrong():
    expected = Scene("red", (SceneObject("blue", "circle", "left"), SceneObject("white", "square", "right")))
    result = score(expected, read_image(canvas("red")))
    assert result == {
        "background": [True],
        "colour": [False, False],
        "shape": [False, False],
        "position": [False, False],
        "count": [False],
    }
