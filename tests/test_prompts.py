"""Prompt sequences of the guidance branches, checked against the reference's string layout.

The expected ids come from tokenizing the whole reference string (image text substituted into the
caption) with the raw `tokenizers` library, independently of the id splicing in model/prompts.py.
"""

import json
import shutil

import pytest
from tokenizers import Tokenizer

from model.config import FAMILY_V1, FAMILY_V11, NextStepConfig
from model.prompts import IMAGE_MARKER, PromptError, PromptSequence, area_text, build_prompt_branches, edit_caption
from model.tokenizer import TextTokenizer, write_tiny_tokenizer

TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 512,
    "boi": 507,
    "eoi": 508,
    "image_placeholder_id": 509,
    "pad_token_id_added": 505,
}
BOI, EOI, PLACEHOLDER, ENDOFTEXT = 507, 508, 509, 504


@pytest.fixture(scope="module")
def config():
    return NextStepConfig.from_dict(TINY_CONFIG)


@pytest.fixture(scope="module")
def v11_config():
    return NextStepConfig.from_dict({**TINY_CONFIG, "family": FAMILY_V11})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, config):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), config)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return TextTokenizer.from_dir(tiny_dir)


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_dir, tmp_path_factory):
    """The tiny tokenizer with "<|endoftext|>" declared as its BOS token."""
    directory = shutil.copytree(tiny_dir, tmp_path_factory.mktemp("bos") / "tokenizer")
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["bos_token"] = "<|endoftext|>"
    path.write_text(json.dumps(data), encoding="utf-8")
    return TextTokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def reference_encode(tiny_dir):
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    return lambda text: raw.encode(text, add_special_tokens=False).ids


def image_string(gh, gw):
    """The reference's replacement for "<image>", as text."""
    return f"<|image_area|>{gh}*{gw}<|begin_of_image|>" + "<|image_placeholder|>" * (gh * gw) + "<|end_of_image|>"


def placeholder_indices(ids):
    return tuple(i for i, token in enumerate(ids) if token == PLACEHOLDER)


def test_area_text_writes_the_grid_as_height_star_width():
    assert area_text(32, 32) == "<|image_area|>32*32"
    assert area_text(3, 17) == "<|image_area|>3*17"


@pytest.mark.parametrize("grid", [(0, 4), (4, -1), (2.0, 2), (True, 2)])
def test_area_text_rejects_grids_that_are_not_positive_integers(grid):
    with pytest.raises(PromptError, match="positive integers"):
        area_text(*grid)


def test_text_to_image_single_branch_is_caption_then_area_then_boi(tokenizer, config, reference_encode):
    (cond,) = build_prompt_branches(tokenizer, config, "A red fox in the snow.", 4, 6, num_branches=1)
    assert cond == PromptSequence(token_ids=tuple(reference_encode("A red fox in the snow.<|image_area|>4*6")) + (BOI,))
    assert cond.image_positions == ()


def test_text_to_image_two_branches_use_the_negative_prompt_as_uncond_caption(tokenizer, config, reference_encode):
    cond, uncond = build_prompt_branches(
        tokenizer, config, "A cat on a sofa", 5, 3, num_branches=2, negative_prompt="blurry, lowres"
    )
    assert list(cond.token_ids) == reference_encode("A cat on a sofa<|image_area|>5*3") + [BOI]
    assert list(uncond.token_ids) == reference_encode("blurry, lowres<|image_area|>5*3") + [BOI]
    assert cond.image_positions == uncond.image_positions == ()


def test_default_negative_prompt_leaves_only_area_and_boi(tokenizer, config):
    _, uncond = build_prompt_branches(tokenizer, config, "A cat", 2, 2, num_branches=2)
    assert list(uncond.token_ids) == [tokenizer.token_id("<|image_area|>"), ord("2"), ord("*"), ord("2"), BOI]


def test_whitespace_negative_prompt_is_encoded_as_is(tokenizer, config, reference_encode):
    _, uncond = build_prompt_branches(tokenizer, config, "A cat", 2, 2, num_branches=2, negative_prompt="  ")
    assert list(uncond.token_ids) == reference_encode("  <|image_area|>2*2") + [BOI]


def test_positive_prompt_is_appended_to_the_caption_with_one_space(tokenizer, config, reference_encode):
    cond, uncond = build_prompt_branches(
        tokenizer, config, "A lake", 2, 3, num_branches=2, positive_prompt="best quality.", negative_prompt="dark"
    )
    assert list(cond.token_ids) == reference_encode("A lake best quality.<|image_area|>2*3") + [BOI]
    assert list(uncond.token_ids) == reference_encode("dark<|image_area|>2*3") + [BOI]


def test_empty_positive_prompt_adds_nothing(tokenizer, config, reference_encode):
    (cond,) = build_prompt_branches(tokenizer, config, "A lake", 2, 3, num_branches=1, positive_prompt="")
    assert list(cond.token_ids) == reference_encode("A lake<|image_area|>2*3") + [BOI]


def test_edit_single_branch_puts_the_input_image_at_the_marker(tokenizer, config, reference_encode):
    (cond,) = build_prompt_branches(tokenizer, config, "Make <image> red.", 4, 4, num_branches=1, input_grid=(2, 3))
    reference = "Make " + image_string(2, 3) + " red.<|image_area|>4*4"
    assert list(cond.token_ids) == reference_encode(reference) + [BOI]


def test_edit_two_branches_keep_the_image_and_drop_the_instruction_in_the_uncond(
    tokenizer, config, reference_encode
):
    cond, uncond_image = build_prompt_branches(
        tokenizer,
        config,
        "<image> Add a hat.",
        3,
        3,
        num_branches=2,
        negative_prompt="Copy original image.",
        input_grid=(2, 2),
    )
    assert list(cond.token_ids) == reference_encode(image_string(2, 2) + " Add a hat.<|image_area|>3*3") + [BOI]
    assert list(uncond_image.token_ids) == reference_encode(
        image_string(2, 2) + "Copy original image.<|image_area|>3*3"
    ) + [BOI]


def test_edit_three_branches_are_cond_uncond_image_and_uncond_without_image(tokenizer, config, reference_encode):
    cond, uncond_image, uncond_none = build_prompt_branches(
        tokenizer,
        config,
        "Turn <image> into a painting",
        2,
        5,
        num_branches=3,
        negative_prompt="blurry",
        positive_prompt="masterpiece",
        input_grid=(3, 2),
    )
    image = image_string(3, 2)
    assert list(cond.token_ids) == reference_encode(
        f"Turn {image} into a painting masterpiece<|image_area|>2*5"
    ) + [BOI]
    assert list(uncond_image.token_ids) == reference_encode(f"{image}blurry<|image_area|>2*5") + [BOI]
    assert list(uncond_none.token_ids) == reference_encode("blurry<|image_area|>2*5") + [BOI]
    assert uncond_none.image_positions == ()


def test_image_positions_point_at_every_placeholder_in_raster_order(tokenizer, config):
    caption = "Make <image> brighter"
    branches = build_prompt_branches(tokenizer, config, caption, 4, 4, num_branches=3, input_grid=(3, 5))
    for branch in branches[:2]:
        assert len(branch.image_positions) == 3 * 5
        assert branch.image_positions == placeholder_indices(branch.token_ids)
        first = branch.image_positions[0]
        assert branch.image_positions == tuple(range(first, first + 15))
        assert branch.token_ids[first - 1] == BOI and branch.token_ids[first + 15] == EOI


def test_nextstep_v11_prepends_bos_to_each_caption_but_not_to_the_area(bos_tokenizer, v11_config, reference_encode):
    cond, uncond = build_prompt_branches(bos_tokenizer, v11_config, "A cat", 2, 2, num_branches=2, negative_prompt="x")
    assert list(cond.token_ids) == [ENDOFTEXT] + reference_encode("A cat<|image_area|>2*2") + [BOI]
    assert list(uncond.token_ids) == [ENDOFTEXT] + reference_encode("x<|image_area|>2*2") + [BOI]
    assert cond.token_ids.count(ENDOFTEXT) == 1


def test_nextstep_v11_edit_puts_bos_before_the_input_image(bos_tokenizer, v11_config, reference_encode):
    _, uncond_image, uncond_none = build_prompt_branches(
        bos_tokenizer, v11_config, "Edit <image>", 2, 2, num_branches=3, input_grid=(1, 2)
    )
    expected_uncond_image = [ENDOFTEXT] + reference_encode(image_string(1, 2) + "<|image_area|>2*2") + [BOI]
    assert list(uncond_image.token_ids) == expected_uncond_image
    assert list(uncond_none.token_ids) == [ENDOFTEXT] + reference_encode("<|image_area|>2*2") + [BOI]
    assert uncond_image.image_positions == (6, 7)


def test_nextstep_v1_never_prepends_bos(bos_tokenizer, config, reference_encode):
    assert config.family == FAMILY_V1
    (cond,) = build_prompt_branches(bos_tokenizer, config, "A cat", 2, 2, num_branches=1)
    assert list(cond.token_ids) == reference_encode("A cat<|image_area|>2*2") + [BOI]


def test_nextstep_v11_without_a_bos_token_prepends_nothing(tokenizer, v11_config, reference_encode):
    (cond,) = build_prompt_branches(tokenizer, v11_config, "A cat", 2, 2, num_branches=1)
    assert list(cond.token_ids) == reference_encode("A cat<|image_area|>2*2") + [BOI]


def test_image_marker_in_a_text_to_image_caption_is_an_error(tokenizer, config):
    with pytest.raises(PromptError, match="no input image"):
        build_prompt_branches(tokenizer, config, "Make <image> red", 2, 2, num_branches=1)


@pytest.mark.parametrize("caption", ["Make it red", "<image> and <image>"])
def test_edit_caption_needs_exactly_one_image_marker(tokenizer, config, caption):
    with pytest.raises(PromptError, match="exactly once"):
        build_prompt_branches(tokenizer, config, caption, 2, 2, num_branches=1, input_grid=(2, 2))


@pytest.mark.parametrize("num_branches", [0, 4, True, 2.0])
def test_num_branches_must_be_one_two_or_three(tokenizer, config, num_branches):
    with pytest.raises(PromptError, match="num_branches"):
        build_prompt_branches(tokenizer, config, "A cat", 2, 2, num_branches=num_branches)


def test_three_branches_need_an_input_image(tokenizer, config):
    with pytest.raises(PromptError, match="need an input image"):
        build_prompt_branches(tokenizer, config, "A cat", 2, 2, num_branches=3)


@pytest.mark.parametrize("grid", [(0, 2), (2, 0)])
def test_output_grid_must_be_positive(tokenizer, config, grid):
    with pytest.raises(PromptError, match="positive integers"):
        build_prompt_branches(tokenizer, config, "A cat", *grid, num_branches=1)


@pytest.mark.parametrize("input_grid", [(0, 2), (2,), [2, 2]])
def test_input_grid_must_be_a_pair_of_positive_integers(tokenizer, config, input_grid):
    with pytest.raises(PromptError, match="input_grid|positive integers"):
        build_prompt_branches(tokenizer, config, "Edit <image>", 2, 2, num_branches=1, input_grid=input_grid)


def test_caption_must_be_a_string(tokenizer, config):
    with pytest.raises(PromptError, match="caption must be a string"):
        build_prompt_branches(tokenizer, config, None, 2, 2, num_branches=1)


@pytest.mark.parametrize("option", ["negative_prompt", "positive_prompt"])
def test_image_marker_in_negative_or_positive_prompt_is_an_error(tokenizer, config, option):
    with pytest.raises(PromptError, match=option):
        build_prompt_branches(
            tokenizer, config, "Edit <image>", 2, 2, num_branches=2, input_grid=(1, 1), **{option: "<image>"}
        )


def test_placeholder_token_typed_into_the_caption_is_an_error(tokenizer, config):
    with pytest.raises(PromptError, match="placeholder"):
        build_prompt_branches(tokenizer, config, "A <|image_placeholder|> cat", 2, 2, num_branches=1)


def test_edit_caption_puts_the_marker_first_unless_the_instruction_places_it():
    assert edit_caption("make the circle blue") == IMAGE_MARKER + "make the circle blue"
    assert edit_caption(f"keep {IMAGE_MARKER} but brighter") == f"keep {IMAGE_MARKER} but brighter"
