"""config.json parsing in both namings, defaults, and the published shapes of the presets."""

import json

import pytest
import torch

from model.config import FAMILY_V1, FAMILY_V11, ConfigError, NextStepConfig
from model.nextstep import NextStepModel, backbone_parameter_count, count_parameters
from model.presets import preset_config

DECODER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "boi": 507,
    "eoi": 508,
    "image_placeholder_id": 509,
}


def test_nextstep1_naming_is_read():
    raw = dict(DECODER, latent_patch_size=2, latent_channels=16, latent_size=32, fm_head_dim=96, fm_head_layers=3)
    config = NextStepConfig.from_dict(raw)
    assert config.family == FAMILY_V1
    assert (config.fm_head_dim, config.fm_head_layers, config.latent_size) == (96, 3, 32)
    assert config.token_dim == 64


def test_nextstep11_naming_is_read_and_sets_the_family():
    raw = dict(DECODER, patch_size=2, num_channels=16, image_size=64, genloss_width=96, genloss_depth=4)
    config = NextStepConfig.from_dict(raw)
    assert config.family == FAMILY_V11
    assert (config.fm_head_dim, config.fm_head_layers, config.latent_size) == (96, 4, 64)


def test_unknown_fields_are_ignored_and_kept_aside():
    config = NextStepConfig.from_dict(dict(DECODER, auto_map={"AutoModel": "x.y"}, torch_dtype="float32"))
    assert config.extra["torch_dtype"] == "float32"


def test_head_dim_defaults_to_hidden_over_heads():
    assert NextStepConfig.from_dict(DECODER).head_dim == 16


def test_o_attention_bias_defaults_to_attention_bias():
    assert NextStepConfig.from_dict(dict(DECODER, attention_bias=True)).o_attention_bias is True
    assert NextStepConfig.from_dict(dict(DECODER, attention_bias=True, o_attention_bias=False)).o_attention_bias is False


def test_missing_required_field_is_a_clear_error():
    raw = dict(DECODER)
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        NextStepConfig.from_dict(raw)


def test_heads_must_group_evenly():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        NextStepConfig.from_dict(dict(DECODER, num_key_value_heads=3))


def test_special_ids_must_fit_the_vocabulary():
    with pytest.raises(ConfigError, match="boi id 151667"):
        NextStepConfig.from_dict(dict(DECODER, boi=151667))


def test_invalid_json_file_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        NextStepConfig.from_file(tmp_path / "config.json")


def test_config_round_trips_through_json():
    config = preset_config("tiny")
    again = NextStepConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("preset", ["nextstep-1-large", "nextstep-1.1"])
def test_published_presets_have_the_published_parameter_counts(preset):
    with torch.device("meta"):
        model = NextStepModel(preset_config(preset))
    assert 13.9e9 < backbone_parameter_count(model) < 14.1e9
    assert 156e6 < count_parameters(model.image_head) < 158e6


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset_config("huge")
