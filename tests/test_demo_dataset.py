"""The demo world: captions follow the grammar, edits change only what they say, splits never mix."""

import numpy as np
import pytest

from model.demo.checker import matches, read_image
from model.demo.dataset import edit_examples, text_to_image_examples
from model.demo.edits import EDIT_KINDS, possible_kinds, random_edit
from model.demo.scenes import Scene, SceneError, SceneObject, caption, is_held_out, random_scene, render


def test_caption_grammar():
    scene = Scene("yellow", (SceneObject("red", "circle", "left"), SceneObject("orange", "square", "right")))
    assert caption(scene) == "a red circle on the left and an orange square on the right, on a yellow background"
    assert caption(scene, with_positions=False) == "a red circle and an orange square, on a yellow background"
    one = Scene("orange", (SceneObject("white", "triangle", "center"),))
    assert caption(one, with_background=False) == "a white triangle in the center"
    assert caption(one) == "a white triangle in the center, on an orange background"


@pytest.mark.parametrize(
    "background, objects",
    [
        ("red", (SceneObject("red", "circle", "left"),)),  # invisible object
        ("red", (SceneObject("blue", "circle", "left"), SceneObject("blue", "square", "top"))),  # not opposite
        ("red", ()),
        ("pink", (SceneObject("blue", "circle", "left"),)),
    ],
)
def test_invalid_scenes_are_refused(background, objects):
    with pytest.raises(SceneError):
        Scene(background, objects)


def test_same_seed_same_examples_other_seed_other_examples():
    assert text_to_image_examples(5, 20) == text_to_image_examples(5, 20)
    assert edit_examples(5, 10) == edit_examples(5, 10)
    assert text_to_image_examples(5, 20) != text_to_image_examples(6, 20)


def test_rendering_is_deterministic():
    scene = random_scene(np.random.default_rng(3), 2)
    assert np.array_equal(np.asarray(render(scene)), np.asarray(render(scene)))


def test_training_never_shows_a_held_out_combination():
    for example in text_to_image_examples(0, 300):
        assert not is_held_out(example.scene.key())
    for edit in edit_examples(0, 100):
        assert not any(is_held_out(key) for key in (edit.key(), edit.source.key(), edit.target.key()))


def test_evaluation_uses_only_held_out_combinations_with_full_captions():
    for example in text_to_image_examples(0, 50, held_out=True):
        assert is_held_out(example.scene.key()) and example.caption == caption(example.scene)
    assert all(is_held_out(edit.key()) for edit in edit_examples(0, 20, held_out=True))


def test_about_a_tenth_of_combinations_is_held_out():
    rng = np.random.default_rng(0)
    share = np.mean([is_held_out(random_scene(rng, 1).key()) for _ in range(2000)])
    assert 0.07 < share < 0.13


def test_edit_examples_cycle_through_every_kind():
    assert [edit.kind for edit in edit_examples(1, 10)] == list(EDIT_KINDS) * 2


def _changed_fields(source: Scene, target: Scene) -> set[str]:
    changed = {"background"} if source.background != target.background else set()
    if len(source.objects) != len(target.objects):
        return changed | {"objects"}
    for a, b in zip(source.objects, target.objects):
        changed |= {name for name in ("colour", "shape", "position", "size", "offset") if getattr(a, name) != getattr(b, name)}
    return changed


@pytest.mark.parametrize(
    "kind, changed",
    [("recolour", {"colour"}), ("move", {"position"}), ("background", {"background"}), ("add", {"objects"}), ("remove", {"objects"})],
)
def test_each_edit_changes_only_what_it_says(kind, changed):
    rng = np.random.default_rng(7)
    done = 0
    while done < 20:
        source = random_scene(rng, 1 + int(rng.integers(2)))
        if kind not in possible_kinds(source):
            continue
        edit = random_edit(rng, source, kind)
        assert _changed_fields(source, edit.target) == changed, edit.instruction
        done += 1


def test_edit_instructions_name_the_change():
    source = Scene("white", (SceneObject("red", "circle", "left"),))
    rng = np.random.default_rng(0)
    recolour = random_edit(rng, source, "recolour")
    assert recolour.instruction == f"make the circle {recolour.target.objects[0].colour}"
    added = random_edit(rng, source, "add")
    new = added.target.objects[1]
    assert new.position == "right" and added.instruction.endswith(f"{new.colour} {new.shape} on the right")
    with pytest.raises(ValueError):
        random_edit(rng, source, "remove")


def test_checker_reads_every_drawn_scene_correctly():
    rng = np.random.default_rng(11)
    for _ in range(150):
        scene = random_scene(rng, 1 + int(rng.integers(2)))
        assert matches(scene, read_image(render(scene))), scene.key()
