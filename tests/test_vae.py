"""The FLUX-style AutoencoderKL: shapes, published weight names, config defaults, checkpoint I/O."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from model.config import FAMILY_V1, FAMILY_V11, ConfigError
from model.vae import (
    TINY_VAE_CONFIG,
    AutoencoderKL,
    VAEConfig,
    VAELoadError,
    load_vae,
    random_vae,
    save_vae,
)


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return random_vae(TINY_VAE_CONFIG, seed=0)


@pytest.fixture
def saved_vae_dir(tmp_path, tiny_vae):
    save_vae(tmp_path, tiny_vae, TINY_VAE_CONFIG)
    return tmp_path


def published_layout() -> dict[str, torch.Size]:
    """Names and shapes of the full-size (published) VAE, built without allocating weights."""
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


# --- shapes -------------------------------------------------------------------------------------


def test_tiny_vae_downsamples_by_8():
    assert TINY_VAE_CONFIG.downsample_factor == 8
    assert VAEConfig().downsample_factor == 8


@pytest.mark.parametrize("height, width", [(32, 32), (48, 32), (16, 40)])
def test_encode_moments_gives_mean_and_logvar_at_one_eighth_size(tiny_vae, height, width):
    pixels = torch.rand(2, 3, height, width) * 2 - 1
    mean, logvar = tiny_vae.encode_moments(pixels)
    assert mean.shape == logvar.shape == (2, 16, height // 8, width // 8)


@pytest.mark.parametrize("h, w", [(4, 4), (3, 5)])
def test_decode_gives_pixels_at_eight_times_the_latent_size(tiny_vae, h, w):
    assert tiny_vae.decode(torch.randn(2, 16, h, w)).shape == (2, 3, 8 * h, 8 * w)


def test_decode_of_unit_normal_latents_is_of_order_one(tiny_vae):
    pixels = tiny_vae.decode(torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(pixels).all()
    assert 0.05 < pixels.std().item() < 5


def test_encode_rejects_sizes_not_multiple_of_8(tiny_vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny_vae.encode_moments(torch.zeros(1, 3, 36, 32))


def test_decode_rejects_wrong_channel_count(tiny_vae):
    with pytest.raises(ValueError, match="16"):
        tiny_vae.decode(torch.zeros(1, 8, 4, 4))


def test_random_vae_is_deterministic_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    first = random_vae(TINY_VAE_CONFIG, seed=3).state_dict()
    second = random_vae(TINY_VAE_CONFIG, seed=3).state_dict()
    other = random_vae(TINY_VAE_CONFIG, seed=4).state_dict()
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["encoder.conv_in.weight"], other["encoder.conv_in.weight"])


def test_encode_moments_clamps_logvar_to_the_posterior_range():
    vae = random_vae(TINY_VAE_CONFIG, seed=1)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    for bias, bound in ((1e4, 20.0), (-1e4, -30.0)):
        vae.encoder.conv_out.bias[16:] = bias
        assert torch.all(vae.encode_moments(pixels)[1] == bound)


# --- numerics against a functional re-statement of the architecture ------------------------------


def reference_norm(x, weights, name):
    return F.group_norm(x, 32, weights[f"{name}.weight"], weights[f"{name}.bias"], eps=1e-6)


def reference_conv(x, weights, name, stride=1):
    kernel = weights[f"{name}.weight"]
    padding = 0 if stride == 2 else kernel.shape[-1] // 2
    return F.conv2d(x, kernel, weights[f"{name}.bias"], stride=stride, padding=padding)


def reference_resnet(x, weights, name):
    h = reference_conv(F.silu(reference_norm(x, weights, f"{name}.norm1")), weights, f"{name}.conv1")
    h = reference_conv(F.silu(reference_norm(h, weights, f"{name}.norm2")), weights, f"{name}.conv2")
    skip = reference_conv(x, weights, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in weights else x
    return skip + h


def reference_attention(x, weights, name):
    b, c, h, w = x.shape
    normed = reference_norm(x, weights, f"{name}.norm")
    q, k, v = (reference_conv(normed, weights, f"{name}.{p}").reshape(b, c, h * w) for p in "qkv")
    scores = torch.einsum("bci,bcj->bij", q, k) / c**0.5
    attended = torch.einsum("bij,bcj->bci", scores.softmax(dim=-1), v).reshape(b, c, h, w)
    return x + reference_conv(attended, weights, f"{name}.proj_out")


def reference_mid(x, weights, name):
    x = reference_resnet(x, weights, f"{name}.block_1")
    x = reference_attention(x, weights, f"{name}.attn_1")
    return reference_resnet(x, weights, f"{name}.block_2")


def reference_encoder(pixels, weights, config):
    h = reference_conv(pixels, weights, "encoder.conv_in")
    for level in range(len(config.ch_mult)):
        for block in range(config.num_res_blocks):
            h = reference_resnet(h, weights, f"encoder.down.{level}.block.{block}")
        if level < len(config.ch_mult) - 1:
            padded = torch.zeros(h.shape[0], h.shape[1], h.shape[2] + 1, h.shape[3] + 1, dtype=h.dtype)
            padded[:, :, : h.shape[2], : h.shape[3]] = h  # one zero row below, one zero column right
            h = reference_conv(padded, weights, f"encoder.down.{level}.downsample.conv", stride=2)
    h = reference_mid(h, weights, "encoder.mid")
    return reference_conv(F.silu(reference_norm(h, weights, "encoder.norm_out")), weights, "encoder.conv_out")


def reference_decoder(z, weights, config):
    h = reference_mid(reference_conv(z, weights, "decoder.conv_in"), weights, "decoder.mid")
    for level in reversed(range(len(config.ch_mult))):
        for block in range(config.num_res_blocks + 1):
            h = reference_resnet(h, weights, f"decoder.up.{level}.block.{block}")
        if level > 0:
            h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            h = reference_conv(h, weights, f"decoder.up.{level}.upsample.conv")
    return reference_conv(F.silu(reference_norm(h, weights, "decoder.norm_out")), weights, "decoder.conv_out")


def test_encoder_matches_the_functional_reference(tiny_vae):
    weights = {k: v.double() for k, v in tiny_vae.state_dict().items()}
    pixels = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = tiny_vae.encode_moments(pixels)
    expected = reference_encoder(pixels.double(), weights, TINY_VAE_CONFIG)
    assert torch.allclose(torch.cat([mean, logvar], dim=1).double(), expected, atol=1e-4)


def test_decoder_matches_the_functional_reference(tiny_vae):
    weights = {k: v.double() for k, v in tiny_vae.state_dict().items()}
    z = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(3))
    expected = reference_decoder(z.double(), weights, TINY_VAE_CONFIG)
    assert torch.allclose(tiny_vae.decode(z).double(), expected, atol=1e-4)


# --- weight names -------------------------------------------------------------------------------


def test_weight_names_and_shapes_follow_the_published_checkpoint():
    layout = published_layout()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.block.0.norm1.weight": (256,),
        "encoder.down.2.block.1.norm2.bias": (512,),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.norm.weight": (512,),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.mid.block_2.conv2.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.bias": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for name, shape in expected.items():
        assert name in layout, name
        assert tuple(layout[name]) == shape, name


def test_levels_have_downsample_and_upsample_only_where_resolution_changes():
    names = published_layout()
    assert "encoder.down.3.downsample.conv.weight" not in names
    assert "decoder.up.0.upsample.conv.weight" not in names
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in names  # same width in and out
    assert "encoder.down.0.block.2.conv1.weight" not in names  # num_res_blocks = 2
    assert "decoder.up.0.block.3.conv1.weight" not in names  # num_res_blocks + 1 = 3
    assert all(not name.startswith(("encoder.quant", "decoder.post_quant")) for name in names)


# --- config -------------------------------------------------------------------------------------


def test_nextstep_1_defaults_sample_the_posterior_without_encoder_norm():
    config = VAEConfig.from_dict({}, FAMILY_V1)
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    assert config.encoder_norm is False and config.deterministic is False
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.z_channels) == (128, (1, 2, 4, 4), 2, 16)


def test_nextstep_1_1_defaults_use_the_normalised_mean():
    config = VAEConfig.from_dict({}, FAMILY_V11)
    assert (config.scaling_factor, config.shift_factor) == (1.0, 0.0)
    assert config.encoder_norm is True and config.deterministic is True and config.psz == 1


def test_config_json_values_win_over_family_defaults_and_unknown_fields_are_ignored():
    raw = {"scaling_factor": 0.5, "encoder_norm": False, "ch_mult": [1, 2, 2, 2], "psz": 2, "lr": 1e-4}
    config = VAEConfig.from_dict(raw, FAMILY_V11)
    assert config.scaling_factor == 0.5 and config.encoder_norm is False and config.psz == 2
    assert config.ch_mult == (1, 2, 2, 2)
    assert config.deterministic is True  # untouched family default


def test_config_round_trips_through_to_dict():
    assert VAEConfig.from_dict(json.loads(json.dumps(TINY_VAE_CONFIG.to_dict())), FAMILY_V11) == TINY_VAE_CONFIG


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ch", 48, "multiple of 32"),
        ("ch_mult", [], "ch_mult"),
        ("ch_mult", [1, 0], "ch_mult"),
        ("num_res_blocks", 0, "num_res_blocks"),
        ("z_channels", 16.0, "z_channels"),
        ("scaling_factor", 0, "scaling_factor"),
        ("shift_factor", "0.1", "shift_factor"),
        ("deterministic", "yes", "deterministic"),
        ("psz", 0, "psz"),
    ],
)
def test_bad_config_values_raise_a_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        VAEConfig.from_dict({field: value}, FAMILY_V1)


def test_unknown_family_is_rejected():
    with pytest.raises(ConfigError, match="family"):
        VAEConfig.from_dict({}, "nextstep-9")


# --- checkpoint I/O -----------------------------------------------------------------------------


def test_save_writes_the_published_layout(saved_vae_dir):
    assert sorted(p.name for p in saved_vae_dir.iterdir()) == ["checkpoint.pt", "config.json"]
    state = torch.load(saved_vae_dir / "checkpoint.pt", weights_only=True)
    assert "encoder.mid.attn_1.q.weight" in state


def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path, tiny_vae):
    with pytest.raises(ValueError, match="architecture"):
        save_vae(tmp_path, tiny_vae, dataclasses.replace(TINY_VAE_CONFIG, ch=64))


def test_save_then_load_gives_identical_outputs(saved_vae_dir, tiny_vae):
    loaded, config = load_vae(saved_vae_dir, FAMILY_V1)
    assert config == TINY_VAE_CONFIG
    pixels = torch.rand(1, 3, 16, 24) * 2 - 1
    z = torch.randn(1, 16, 2, 3)
    assert torch.equal(loaded.encode_moments(pixels)[0], tiny_vae.encode_moments(pixels)[0])
    assert torch.equal(loaded.decode(z), tiny_vae.decode(z))


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_load_accepts_a_state_dict_nested_under_a_wrapper_key(saved_vae_dir, tiny_vae, wrapper):
    torch.save({wrapper: tiny_vae.state_dict(), "step": torch.tensor(5)}, saved_vae_dir / "checkpoint.pt")
    loaded, _ = load_vae(saved_vae_dir, FAMILY_V1)
    assert torch.equal(loaded.decoder.conv_out.weight, tiny_vae.decoder.conv_out.weight)


def test_load_casts_to_the_requested_dtype(saved_vae_dir):
    loaded, _ = load_vae(saved_vae_dir, FAMILY_V1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.decode(torch.randn(1, 16, 2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("missing", ["config.json", "checkpoint.pt"])
def test_load_reports_a_missing_file(saved_vae_dir, missing):
    (saved_vae_dir / missing).unlink()
    with pytest.raises(VAELoadError, match=missing):
        load_vae(saved_vae_dir, FAMILY_V1)


def test_load_names_a_missing_key(saved_vae_dir, tiny_vae):
    state = tiny_vae.state_dict()
    del state["decoder.up.2.upsample.conv.bias"]
    torch.save(state, saved_vae_dir / "checkpoint.pt")
    with pytest.raises(VAELoadError, match=r"missing keys \(1\): decoder\.up\.2\.upsample\.conv\.bias"):
        load_vae(saved_vae_dir, FAMILY_V1)


def test_load_reports_and_ignores_an_unexpected_key(saved_vae_dir, tiny_vae, caplog):
    state = dict(tiny_vae.state_dict(), **{"encoder.quant_conv.weight": torch.zeros(1)})
    torch.save(state, saved_vae_dir / "checkpoint.pt")
    loaded, _ = load_vae(saved_vae_dir, FAMILY_V1)
    assert "unexpected keys (1): encoder.quant_conv.weight" in caplog.text
    assert "encoder.quant_conv.weight" not in loaded.state_dict()


def test_load_names_a_wrong_shape(saved_vae_dir, tiny_vae):
    state = dict(tiny_vae.state_dict(), **{"encoder.conv_out.weight": torch.zeros(16, 64, 3, 3)})
    torch.save(state, saved_vae_dir / "checkpoint.pt")
    with pytest.raises(VAELoadError, match=r"encoder\.conv_out\.weight \(checkpoint \[16, 64, 3, 3\], model \[32"):
        load_vae(saved_vae_dir, FAMILY_V1)


def test_load_lists_a_few_missing_keys_and_counts_the_rest(saved_vae_dir, tiny_vae):
    state = {k: v for k, v in tiny_vae.state_dict().items() if not k.startswith("decoder.mid.")}
    torch.save(state, saved_vae_dir / "checkpoint.pt")
    with pytest.raises(VAELoadError) as error:
        load_vae(saved_vae_dir, FAMILY_V1)
    assert "missing keys (26)" in str(error.value) and "... and 21 more" in str(error.value)


def test_load_rejects_a_config_that_does_not_match_the_weights(saved_vae_dir):
    config = dataclasses.replace(TINY_VAE_CONFIG, z_channels=8)
    (saved_vae_dir / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(VAELoadError, match="wrong shapes"):
        load_vae(saved_vae_dir, FAMILY_V1)


def test_load_rejects_a_checkpoint_that_is_not_a_state_dict(saved_vae_dir):
    torch.save([torch.zeros(1)], saved_vae_dir / "checkpoint.pt")
    with pytest.raises(VAELoadError, match="not a state dict"):
        load_vae(saved_vae_dir, FAMILY_V1)


def test_load_rejects_a_corrupt_checkpoint(saved_vae_dir):
    (saved_vae_dir / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(VAELoadError, match="cannot read"):
        load_vae(saved_vae_dir, FAMILY_V1)
