"""The reference generator: determinism, batch independence, non-square sizes, edits, bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle
from model.decoder import KVCache
from model.noise import token_noise
from model.reference import GenerationRequest, RequestError
from model.sampling import SamplingError, branch_count, finalize_token, published_defaults, sample_token


@pytest.fixture(scope="module")
def bundle():
    return load_bundle("tiny", seed=0)


@pytest.fixture(scope="module")
def generator(bundle):
    return bundle.reference_generator()


def t2i(**overrides):
    params = replace(published_defaults("nextstep-1", edit=False), num_steps=6)
    fields = dict(prompt="a red circle on the left", width=64, height=64, params=params, seed=7)
    fields.update(overrides)
    return GenerationRequest(**fields)


def test_same_request_gives_the_same_bytes(generator):
    a = generator.generate(t2i())
    b = generator.generate(t2i())
    assert torch.equal(a.pixels, b.pixels)
    assert a.pixels.dtype == torch.uint8 and a.pixels.shape == (1, 64, 64, 3)


def test_images_of_one_request_get_different_noise(generator):
    result = generator.generate(t2i(n=2))
    assert not torch.equal(result.tokens[0], result.tokens[1])


def test_an_image_does_not_depend_on_the_other_images_of_its_request(generator):
    alone = generator.generate(t2i(n=1))
    batched = generator.generate(t2i(n=3))
    assert torch.equal(batched.tokens[0], alone.tokens[0])
    assert torch.equal(batched.pixels[0], alone.pixels[0])


def test_different_seeds_give_different_images(generator):
    assert not torch.equal(generator.generate(t2i(seed=1)).tokens, generator.generate(t2i(seed=2)).tokens)


@pytest.mark.parametrize("width,height", [(64, 32), (32, 64), (48, 16)])
def test_non_square_sizes_render_in_raster_order(generator, width, height):
    result = generator.generate(t2i(width=width, height=height))
    assert result.pixels.shape == (1, height, width, 3)
    assert result.tokens.shape == (1, (height // 16) * (width // 16), 64)


def test_every_sampler_renders_finite_tokens(generator):
    for sampler in ("legacy-sde", "sde", "cps", "ode"):
        params = replace(published_defaults("nextstep-1.1", edit=False), sampler=sampler, num_steps=4)
        result = generator.generate(t2i(width=32, height=32, params=params))
        assert torch.isfinite(result.tokens).all(), sampler


def test_on_token_reports_every_token_in_order(generator):
    seen = []
    generator.generate(t2i(width=32, height=48), on_token=lambda k, tok: seen.append((k, tuple(tok.shape))))
    assert seen == [(k, (1, 64)) for k in range(6)]


def test_second_token_matches_a_full_uncached_forward(bundle, generator):
    """The sampled token is fed back to every branch: recompute token 1 from scratch and compare."""
    request = t2i(width=32, height=16, n=2)
    result = generator.generate(request)
    model, params = bundle.model, request.params
    branches = generator.prompt_branches(request)
    assert len(branches) == branch_count(params, has_image=False) == 2
    conditions = []
    for branch in branches:
        ids = torch.tensor(branch.token_ids)[None].expand(2, -1)
        embeds = torch.cat([model.embed(ids), model.embed_image_token(result.tokens[:, 0])], dim=1)
        cache = KVCache(model.config, 2, embeds.shape[1], "cpu", torch.float32)
        with torch.no_grad():
            conditions.append(model.head_condition(model.forward_hidden(embeds, cache)[:, -1], 1))
    conditions = torch.cat(conditions)

    def velocity(x, t):
        with torch.no_grad():
            return model.image_head.velocity(x.repeat(2, 1), t, conditions).view(2, 2, -1)

    def noise(step):
        return token_noise(request.seed, torch.arange(2), 1, step, 64)

    token = finalize_token(sample_token(velocity, params, 1, 2, noise, 2), params.use_norm)
    torch.testing.assert_close(token, result.tokens[:, 1], rtol=1e-4, atol=1e-4)


def _input_image(color):
    image = Image.new("RGB", (80, 48), color)
    image.paste((255, 255, 255), (30, 10, 50, 30))
    return image


def test_edit_uses_three_branches_and_depends_on_the_input_image(generator):
    params = replace(published_defaults("nextstep-1", edit=True), num_steps=4)
    request = t2i(prompt="<image>make the square blue", params=params, width=32, height=32, n=2)
    assert len(generator.prompt_branches(replace(request, image=_input_image("red")))) == 3
    red = generator.generate(replace(request, image=_input_image("red")))
    green = generator.generate(replace(request, image=_input_image("green")))
    assert red.pixels.shape == (2, 32, 32, 3)
    assert not torch.equal(red.tokens, green.tokens)


def test_bfloat16_model_renders(tmp_path):
    bundle = load_bundle("tiny", dtype=torch.bfloat16)
    result = bundle.reference_generator().generate(t2i(width=32, height=32))
    assert torch.isfinite(result.tokens).all()
    assert result.tokens.dtype == torch.float32


def test_gen_pos_embed_changes_the_condition_per_token(bundle):
    model = bundle.model
    hidden = torch.randn(1, model.config.hidden_size)
    model.gen_pos_embed = torch.randn(1, 4, model.config.hidden_size)
    try:
        with torch.no_grad():
            c0, c1 = model.head_condition(hidden, 0), model.head_condition(hidden, 1)
            assert not torch.equal(c0, c1)
            with pytest.raises(ValueError, match="beyond gen_pos_embed"):
                model.head_condition(hidden, 4)
    finally:
        model.gen_pos_embed = None


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(width=40), RequestError, "width must be a positive multiple of 16"),
        (dict(height=0), RequestError, "height must be a positive multiple of 16"),
        (dict(n=0), RequestError, "n must be a positive integer"),
        (dict(seed=-1), RequestError, "seed"),
        (dict(prompt="<image> <image> two"), ValueError, "<image>"),
    ],
)
def test_bad_requests_are_clear_errors(generator, overrides, error, match):
    request = t2i(**overrides)
    if "<image>" in request.prompt:
        request = replace(request, image=_input_image("red"), params=published_defaults("nextstep-1", edit=True))
    with pytest.raises(error, match=match):
        generator.generate(request)


def test_edit_prompt_without_image_marker_is_a_clear_error(generator):
    request = t2i(prompt="make it blue", image=_input_image("red"))
    with pytest.raises(ValueError, match="<image>"):
        generator.generate(request)


@pytest.mark.parametrize(
    "params_overrides,match",
    [
        (dict(sampler="euler"), "sampler"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(image_guidance_scale=float("inf")), "image_guidance_scale"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(generator, params_overrides, match):
    with pytest.raises(SamplingError, match=match):
        params = replace(published_defaults("nextstep-1", edit=False), **params_overrides)
        generator.generate(t2i(params=params))


def test_generate_command_writes_pngs(tmp_path):
    from model.generate import main

    out = tmp_path / "img.png"
    code = main(["--model", "tiny", "--prompt", "a blue square", "--size", "32x48", "--n", "2", "--steps", "3", "--out", str(out)])
    assert code == 0
    for i in range(2):
        picture = Image.open(tmp_path / f"img-{i}.png")
        assert picture.size == (32, 48)
        assert np.asarray(picture).dtype == np.uint8


def test_generate_command_reports_bad_size(tmp_path, capsys):
    from model.generate import main

    code = main(["--model", "tiny", "--prompt", "x", "--size", "30x30", "--out", str(tmp_path / "x.png")])
    assert code == 2
    assert "multiple of 16" in capsys.readouterr().err
