"""Loading a checkpoint directory written in the exact published layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.bundle import load_bundle
from model.checkpoint import INDEX_FILE, CheckpointError, load_model
from model.config import FAMILY_V1, FAMILY_V11
from model.presets import preset_config, random_model
from model.write_checkpoint import main as write_checkpoint_main
from model.write_checkpoint import write_checkpoint


@pytest.fixture(scope="module")
def tiny():
    config = preset_config("tiny")
    return config, random_model(config, seed=3)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("naming", [FAMILY_V1, FAMILY_V11])
def test_sharded_checkpoint_loads_in_both_namings(tmp_path, tiny, naming):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, naming=naming, shards=3)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert ("genloss_width" in raw) == (naming == FAMILY_V11)
    assert len(set(json.loads((tmp_path / INDEX_FILE).read_text())["weight_map"].values())) == 3

    loaded, report = load_model(tmp_path)
    assert loaded.config.family == naming
    assert report.skipped == ["lm_head.weight"]
    assert report.unexpected == []
    _assert_same_weights(loaded, model)


def test_single_file_checkpoint_with_model_prefix_loads(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=1, key_prefix="model.")
    assert (tmp_path / "model.safetensors").is_file()
    loaded, report = load_model(tmp_path)
    assert report.skipped == ["model.lm_head.weight"]
    _assert_same_weights(loaded, model)


def test_weights_are_cast_to_the_requested_dtype(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=2)
    loaded, _ = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in loaded.parameters())


def test_missing_weight_is_reported_by_name(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=1)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 weight\(s\): layers.2.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_wrong_shape_is_reported(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=1)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["norm.weight"] = torch.ones(7)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(7,\)"):
        load_model(tmp_path)


def test_unexpected_weight_is_reported_not_loaded(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=1)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["vision_tower.weight"] = torch.ones(2)
    save_file(tensors, tmp_path / "model.safetensors")
    _, report = load_model(tmp_path)
    assert report.unexpected == ["vision_tower.weight"]


def test_missing_shard_file_is_reported(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path)


def test_directory_without_weights_or_config_is_reported(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset_config("tiny").to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


def test_gen_pos_embed_loads_when_enabled(tmp_path):
    config = preset_config("tiny")
    config = type(config).from_dict(dict(config.to_dict(), use_gen_pos_embed=True))
    model = random_model(config, seed=4)
    write_checkpoint(tmp_path, config, model, shards=1)
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.gen_pos_embed, model.gen_pos_embed)


def test_python_shipped_in_the_checkpoint_is_never_run(tmp_path, tiny):
    config, model = tiny
    write_checkpoint(tmp_path, config, model, shards=1)
    sentinel = tmp_path / "executed"
    for package in ("models", "utils"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').write('x')\n")
    bundle = load_bundle(tmp_path)
    assert bundle.config.hidden_size == config.hidden_size
    assert not sentinel.exists()


def test_write_checkpoint_command_writes_the_published_layout(tmp_path):
    write_checkpoint_main(["--preset", "tiny", "--out", str(tmp_path), "--naming", "nextstep-1.1", "--shards", "2"])
    for name in ("config.json", INDEX_FILE, "tokenizer.json", "tokenizer_config.json", "vae/config.json", "vae/checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    bundle = load_bundle(tmp_path)
    assert bundle.config.family == FAMILY_V11
